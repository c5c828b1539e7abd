// An emulated Meta Quest 3 for trying the app's WebXR mode without a headset: bundled by the
// browser tests (tests/test_webapp.py) and injected before the page's own scripts. It is never
// part of the app's bundle. The device is at window.xrDevice for the test to drive.
import { XRDevice, metaQuest3 } from "iwer";

const device = new XRDevice(metaQuest3);
device.installRuntime({ forceInstall: true });
window.xrDevice = device;
