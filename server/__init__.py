"""The medverse room server (aiohttp + uvloop): the only part of medverse that does I/O.

Data flows one way, and the modules read in that order::

    transport.py                  socket bytes -> WebSocket messages (protocol/rfc6455.py parses)
    session.py                    one connection: protocol.connection's state machine, limits
    registry.py -> room.py        which room; a room's members, lobby and plugins
    plugins.py                    the room plugin API (moderation.py, audio/, objects.py use it)
    entities.py                   every room's quantized poses in one numpy table
    tick.py (clock.py)            at a fixed rate: inputs -> one encode of every room -> fan-out
    room.py (send_state)          one prebuilt frame per room written to each member

A pose goes socket -> session -> room.submit_pose -> entities (validated in the tick's batch)
-> tick -> every member. An audio frame goes WebRTC -> audio's speaker inbox -> the mixer
(decode once per speaker, one gain matrix, encode once per listener) -> WebRTC. An annotation
goes socket -> session -> room -> objects plugin -> storage (committed before anything else)
-> broadcast and acknowledgement.

``app.create_app`` wires it all; ``cli`` is the ``medverse`` command.
"""
