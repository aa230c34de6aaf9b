"""Wire messages shared by the agent and the controller, defined once.

`common` holds the event record both channels carry; `mqtt` the MQTT payloads; `ws` the
websocket frames. Every JSON payload has a `schema` (MQTT) or `protocol` (websocket) version.
"""
