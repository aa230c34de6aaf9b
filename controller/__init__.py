"""soundedge controller: watches the fleet over MQTT and collects event files over websockets."""
