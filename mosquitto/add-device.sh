#!/bin/sh
# Add (or change) the broker credentials of a soundedge device or controller.
#
#   add-device.sh NAME [PASSWORD_FILE]
#
# NAME is the device id (it is also the MQTT user name the ACL matches), or `controller` /
# `homeassistant`. The password is read from $SOUNDEDGE_DEVICE_PASSWORD or generated. The lines
# to put in the device's environment file are printed. Reload Mosquitto afterwards
# (`systemctl reload mosquitto`, or `kill -HUP` its pid).
set -eu

name=${1:?usage: add-device.sh NAME [PASSWORD_FILE]}
file=${2:-/etc/mosquitto/soundedge.passwd}

case "$name" in
    *[!A-Za-z0-9_-]* | [_-]*)
        echo "add-device.sh: '$name' is not a valid device id (letters, digits, '-', '_')" >&2
        exit 2 ;;
esac
if [ "${#name}" -gt 64 ]; then
    echo "add-device.sh: '$name' is longer than 64 characters" >&2
    exit 2
fi

password=${SOUNDEDGE_DEVICE_PASSWORD:-$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')}

if [ ! -f "$file" ]; then
    (umask 077 && : > "$file")
fi
# -b takes the password from the command line: briefly visible in `ps` on this machine only.
mosquitto_passwd -b "$file" "$name" "$password"
# Mosquitto drops to its own user: it must be able to read the file.
if id mosquitto >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    chown root:mosquitto "$file" && chmod 0640 "$file"
fi

echo "added '$name' to $file"
case "$name" in
    controller)
        echo "# environment of the controller:"
        echo "SOUNDEDGE_CONTROLLER_MQTT__USERNAME=$name"
        echo "SOUNDEDGE_CONTROLLER_MQTT__PASSWORD=$password" ;;
    homeassistant)
        echo "# Home Assistant MQTT integration: user $name, password $password" ;;
    *)
        echo "# environment of the device (e.g. /etc/soundedge/agent.env):"
        echo "SOUNDEDGE_DEVICE_ID=$name"
        echo "SOUNDEDGE_MQTT__USERNAME=$name"
        echo "SOUNDEDGE_MQTT__PASSWORD=$password" ;;
esac
