#!/usr/bin/env bash
# The whole system on one machine, in a minute: a Mosquitto broker with the project's
# configuration, a virtual microphone (PulseAudio null sink), two agents, the controller, and
# sample sounds (sox, espeak-ng). Shows the events arriving and the files being archived, then
# stops everything cleanly (also on Ctrl-C) and says where the files are.
#
#   scripts/demo.sh            # set up (scripts/dev-setup.sh), then the demo
#   scripts/demo.sh --short    # CI: two sounds, then check that every event was seen, archived
#                              # and verified (sha256); exit status 1 if not
#
# Options: --dir DIR (where everything goes; default a new /tmp/soundedge-demo.*),
# --no-setup (use the soundedge commands already on PATH), --timeout S (how long to wait for
# the archive, default 60). Linux only (PulseAudio).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

SHORT=0
SETUP=1
WORKDIR=""
TIMEOUT_S=60
while [[ $# -gt 0 ]]; do
  case "$1" in
    --short) SHORT=1; shift ;;
    --no-setup) SETUP=0; shift ;;
    --dir) WORKDIR=${2:?--dir needs a directory}; shift 2 ;;
    --timeout) TIMEOUT_S=${2:?--timeout needs seconds}; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
note() { printf '%s\n' "$*" >&2; }

if [[ $SETUP == 1 ]]; then
  step "Setting up (system packages, .venv): scripts/dev-setup.sh"
  bash "$REPO/scripts/dev-setup.sh"
fi
if [[ -x "$REPO/.venv/bin/soundedge" ]]; then
  export PATH="$REPO/.venv/bin:$PATH"
fi
for tool in soundedge soundedge-controller mosquitto mosquitto_passwd pulseaudio pactl pacat \
  paplay sox espeak-ng; do
  command -v "$tool" >/dev/null || {
    echo "demo.sh: $tool not found: run scripts/dev-setup.sh (or drop --no-setup)" >&2
    exit 1
  }
done
PYTHON="$(dirname "$(command -v soundedge)")/python"
[[ -x "$PYTHON" ]] || PYTHON=python3

WORKDIR="${WORKDIR:-$(mktemp -d /tmp/soundedge-demo.XXXXXX)}"
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
LOGS="$WORKDIR/logs"
ARCHIVE="$WORKDIR/archive"
mkdir -p "$LOGS" "$ARCHIVE"

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
secret() { head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9'; }

PIDS=()  # helpers this script started (broker, sound server, tails), stopped last
SERVICE_PIDS=()  # agents and controller: SIGTERM, then wait for their clean exit
STOPPED=0
# Stop the agents and the controller as systemd would (SIGTERM); 0 if all exited cleanly.
stop_services() {
  local pid status=0 code
  [[ $STOPPED == 1 ]] && return 0
  STOPPED=1
  step "Stopping the agents and the controller (SIGTERM: they finish what they are writing)"
  for pid in "${SERVICE_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${SERVICE_PIDS[@]}"; do
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      note "process $pid did not stop in 30 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      status=1
    fi
    code=0
    wait "$pid" 2>/dev/null || code=$?
    if [[ $code != 0 ]]; then
      note "process $pid exited with status $code"
      status=1
    fi
  done
  return "$status"
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_services || true
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[i]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  note ""
  note "Everything is in $WORKDIR:"
  note "  archive (collected by the controller): $ARCHIVE"
  note "  agents' own copies:                    $WORKDIR/demo-a/events, $WORKDIR/demo-b/events"
  note "  logs:                                  $LOGS"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the broker -----------------------------------------------------------------------------
step "Starting Mosquitto with mosquitto/mosquitto.conf (own port, own files)"
MQTT_PORT=$(free_port)
BROKER="$WORKDIR/broker"
mkdir -p "$BROKER"
cp "$REPO/mosquitto/acl" "$BROKER/acl"
# The production configuration with this machine's paths and a loopback listener.
awk '
  $1 ~ /^(listener|password_file|acl_file|persistence_location|log_dest|pid_file|user|include_dir|cafile|certfile|keyfile|require_certificate|tls_version|use_identity_as_username)$/ { next }
  { print }
' "$REPO/mosquitto/mosquitto.conf" >"$BROKER/mosquitto.conf"
cat >>"$BROKER/mosquitto.conf" <<EOF
# --- demo: paths and listener
listener $MQTT_PORT 127.0.0.1
password_file $BROKER/passwd
acl_file $BROKER/acl
persistence_location $BROKER/
log_dest file $LOGS/mosquitto.log
user $(id -un)
EOF
declare -A PASSWORD
for user in controller demo-a demo-b; do
  PASSWORD[$user]=$(secret)
  SOUNDEDGE_DEVICE_PASSWORD=${PASSWORD[$user]} sh "$REPO/mosquitto/add-device.sh" "$user" \
    "$BROKER/passwd" >/dev/null
done
mosquitto -c "$BROKER/mosquitto.conf" >>"$LOGS/mosquitto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  (: </dev/tcp/127.0.0.1/"$MQTT_PORT") 2>/dev/null && break  # listening
  sleep 0.1
done
note "broker on 127.0.0.1:$MQTT_PORT, users controller, demo-a, demo-b (ACL: mosquitto/acl)"

# --- the virtual microphone -----------------------------------------------------------------
step "Starting a virtual microphone (PulseAudio null sink 'virt'; PortAudio device 'pulse')"
PULSE_DIR="$WORKDIR/pulse"
mkdir -p "$PULSE_DIR/home" "$PULSE_DIR/run"
chmod 700 "$PULSE_DIR/run"
export HOME="$PULSE_DIR/home" XDG_RUNTIME_DIR="$PULSE_DIR/run"
export PULSE_SERVER="unix:$PULSE_DIR/run/pulse/native"
pulseaudio -n --daemonize=no --exit-idle-time=-1 --disallow-exit --use-pid-file=no \
  "--load=module-null-sink sink_name=virt rate=48000 channels=2" \
  "--load=module-native-protocol-unix" >>"$LOGS/pulseaudio.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 200); do
  pactl info >/dev/null 2>&1 && break
  sleep 0.1
done
pactl info >/dev/null || { echo "demo.sh: pulseaudio did not start (see $LOGS)" >&2; exit 1; }
# A quiet room: pink noise at about -50 dBFS, all the time (the agents track it as noise floor).
sox -q -n -r 48000 -c 2 -b 16 -t raw - synth 3600 pinknoise vol 0.01 |
  pacat -d virt --raw --format=s16le --rate=48000 --channels=2 2>/dev/null &
PIDS+=($!)

# --- the sample sounds ----------------------------------------------------------------------
SOUNDS="$WORKDIR/sounds"
mkdir -p "$SOUNDS"
sox -q -n -r 48000 -c 1 "$SOUNDS/whistle.wav" synth 0.8 sine 2000 fade 0.02 0.8 0.05 vol 0.5
sox -q -n -r 48000 -c 1 "$SOUNDS/clap.wav" synth 0.08 whitenoise fade 0 0.08 0.07 vol 0.9
sox -q -n -r 48000 -c 1 "$SOUNDS/knocks.wav" synth 0.12 sine 180 fade 0 0.12 0.1 vol 0.8 \
  pad 0 0.25 repeat 2
espeak-ng -w "$SOUNDS/speech.wav" "Hello! This is the sound edge demo." 2>/dev/null

# --- the controller and two agents ----------------------------------------------------------
TOKEN=$(secret)
step "Starting the controller (soundedge-controller run) and two agents (soundedge run)"
mkdir -p "$WORKDIR/controller"
controller_env=(
  "SOUNDEDGE_CONTROLLER_ARCHIVE_DIR=$ARCHIVE"
  "SOUNDEDGE_CONTROLLER_MQTT__HOST=127.0.0.1"
  "SOUNDEDGE_CONTROLLER_MQTT__PORT=$MQTT_PORT"
  "SOUNDEDGE_CONTROLLER_MQTT__USERNAME=controller"
  "SOUNDEDGE_CONTROLLER_MQTT__PASSWORD=${PASSWORD[controller]}"
  "SOUNDEDGE_CONTROLLER_WS_TOKEN=$TOKEN"
)
# A controller command in the controller's directory and environment (exec: $! is its pid).
controller() {
  (cd "$WORKDIR/controller" && exec env "${controller_env[@]}" soundedge-controller "$@")
}
(cd "$WORKDIR/controller" &&
  exec env "${controller_env[@]}" soundedge-controller run >>"$LOGS/controller.log" 2>&1) &
SERVICE_PIDS+=($!)

for device in demo-a demo-b; do
  ws_port=$(free_port)
  mkdir -p "$WORKDIR/$device"
  (cd "$WORKDIR/$device" && exec env \
    "SOUNDEDGE_DEVICE_ID=$device" \
    "SOUNDEDGE_DATA_DIR=$WORKDIR/$device" \
    "SOUNDEDGE_AUDIO__DEVICE=pulse" \
    "SOUNDEDGE_MQTT__HOST=127.0.0.1" \
    "SOUNDEDGE_MQTT__PORT=$MQTT_PORT" \
    "SOUNDEDGE_MQTT__USERNAME=$device" \
    "SOUNDEDGE_MQTT__PASSWORD=${PASSWORD[$device]}" \
    "SOUNDEDGE_MQTT__HEALTH_INTERVAL_S=2" \
    "SOUNDEDGE_WS__HOST=127.0.0.1" \
    "SOUNDEDGE_WS__PORT=$ws_port" \
    "SOUNDEDGE_WS__PUBLIC_URL=ws://127.0.0.1:$ws_port" \
    "SOUNDEDGE_WS__TOKEN=$TOKEN" \
    soundedge run >>"$LOGS/$device.log" 2>&1) &
  SERVICE_PIDS+=($!)
  note "agent $device: data $WORKDIR/$device, websocket port $ws_port"
done

# Ready when the broker holds a health message saying capture runs, for both agents.
step "Waiting for both agents to capture and the controller to see them"
ready=0
deadline=$((SECONDS + TIMEOUT_S))
while ((SECONDS < deadline)); do
  running=$(mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -u controller \
    -P "${PASSWORD[controller]}" -t 'soundedge/+/health' -C 2 -W 2 2>/dev/null |
    grep -c '"capture_state":"running"' || true)
  seen=$(controller devices 2>/dev/null | grep -cE '^demo-[ab] +online' || true)
  if [[ $running -ge 2 && $seen -ge 2 ]]; then
    ready=1
    break
  fi
  for pid in "${SERVICE_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "demo.sh: a process exited early; see $LOGS" >&2; exit 1; }
  done
  sleep 0.5
done
if [[ $ready != 1 ]]; then
  echo "demo.sh: the agents or the controller did not come up in ${TIMEOUT_S} s; see $LOGS" >&2
  exit 1
fi
controller devices >&2
if [[ $SHORT == 0 ]]; then
  note ""
  note "Watch the raw MQTT traffic from another terminal meanwhile:"
  note "  mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -u controller -P '${PASSWORD[controller]}' -v -t 'soundedge/#'"
fi

# Every event as any MQTT client sees it (here: the controller's `tail`).
EVENTS="$WORKDIR/events.jsonl"
(cd "$WORKDIR/controller" &&
  exec env "${controller_env[@]}" soundedge-controller tail --json) >"$EVENTS" 2>>"$LOGS/tail.log" &
PIDS+=($!)
if [[ $SHORT == 0 ]]; then
  (cd "$WORKDIR/controller" &&
    exec env "${controller_env[@]}" soundedge-controller tail) 2>>"$LOGS/tail.log" &
  PIDS+=($!)
fi
sleep 3  # let the agents learn the room's noise floor

# --- the sounds -----------------------------------------------------------------------------
if [[ $SHORT == 1 ]]; then
  playlist=(whistle speech)
else
  playlist=(whistle clap speech knocks)
fi
step "Playing ${#playlist[*]} sounds into the virtual microphone: both agents hear each one"
for sound in "${playlist[@]}"; do
  note "♪ $sound"
  paplay -d virt "$SOUNDS/$sound.wav"
  sleep 3  # the event ends after the hang time, its file after the post-roll
done

# --- the check ------------------------------------------------------------------------------
step "Waiting for every event file to reach the archive (verified by sha256)"
check() {
  "$PYTHON" - "$EVENTS" "$ARCHIVE" "${playlist[*]}" <<'EOF'
import hashlib, json, sys
from pathlib import Path

events_file, archive, playlist = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()
ends = {}
for line in events_file.read_text(encoding="utf-8").splitlines():
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if isinstance(message, dict) and message.get("type") == "end" and message.get("file"):
        ends[message["event_id"]] = message
per_device = {d: [m for m in ends.values() if m["device_id"] == d] for d in ("demo-a", "demo-b")}
problems = [f"{d}: no event seen" for d, found in per_device.items() if not found]
verified = 0
for message in ends.values():
    name = message["file"]["name"]
    found = list((archive / message["device_id"]).glob(f"*/{name}"))
    if not found:
        problems.append(f"{message['device_id']} {name}: not archived yet")
        continue
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    sidecar = found[0].with_name(found[0].name + ".json")
    recorded = json.loads(sidecar.read_text())["file"]["sha256"] if sidecar.exists() else None
    if digest != message["file"]["sha256"] or recorded != digest:
        problems.append(f"{found[0]}: sha256 does not match")
        continue
    verified += 1
counts = ", ".join(f"{d}: {len(found)}" for d, found in per_device.items())
print(f"events seen ({counts}); {verified} of {len(ends)} files archived and verified")
for problem in problems:
    print("  " + problem)
sys.exit(1 if problems else 0)
EOF
}
ok=0
deadline=$((SECONDS + TIMEOUT_S))
while ((SECONDS < deadline)); do
  if check >"$WORKDIR/check.txt" 2>&1; then
    ok=1
    break
  fi
  sleep 1
done
cat "$WORKDIR/check.txt" >&2

if [[ $SHORT == 0 ]]; then
  step "The controller's index: soundedge-controller events"
  controller events --limit 20 >&2 || true
  step "The archive: <device>/<date>/<file> + a .json sidecar"
  (cd "$ARCHIVE" && find . -type f ! -path './.claims/*' ! -name '*.db*' | sort) >&2
fi
if [[ $ok != 1 ]]; then
  echo "demo.sh: not every event was archived and verified in ${TIMEOUT_S} s; see $LOGS" >&2
  exit 1
fi
if ! stop_services; then
  echo "demo.sh: an agent or the controller did not stop cleanly; see $LOGS" >&2
  exit 1
fi
# A clean stop leaves the retained status `stopped` (a crash would leave `offline`).
statuses=$(mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -u controller -P "${PASSWORD[controller]}" \
  -t 'soundedge/+/status' -v -C 2 -W 5 2>/dev/null || true)
note "$statuses"
if [[ $(grep -c ' stopped$' <<<"$statuses") != 2 ]]; then
  echo "demo.sh: the agents did not report a clean stop on MQTT" >&2
  exit 1
fi
step "Demo OK: events seen, files archived and verified, everything stopped cleanly"
