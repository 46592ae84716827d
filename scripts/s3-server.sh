#!/usr/bin/env bash
# A real S3 server on loopback for tests and the demo: a one-node Ceph cluster (monitor,
# memstore OSD) and its RADOS gateway, all under one folder, bound to 127.0.0.1.
#
#   scripts/s3-server.sh install            apt-get the Ceph packages (root, Debian)
#   scripts/s3-server.sh start DIR [PORT]   start; prints the endpoint and test keys as env
#   scripts/s3-server.sh stop DIR           stop every daemon started in DIR
#
# What makes it work (see issue 3): osd objectstore = memstore, pool size 1, auth none,
# 'ms mon client mode = crc' and a client.rgw keyring for the gateway (without them radosgw
# hangs on auth error -13).
set -euo pipefail

cmd=${1:?usage: s3-server.sh install|start DIR [PORT]|stop DIR}

install() {
  if command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null; then
    return 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    radosgw ceph-mon ceph-osd ceph-common >/dev/null
}

new_uuid() {  # not uuidgen: uuid-runtime may be missing where the Ceph packages are already installed
  python3 -c 'import uuid; print(uuid.uuid4())'
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  local dir=${1:?start needs DIR} port=${2:-$(free_port)}
  dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
  local mon_port fsid conf key secret
  mon_port=$(free_port)
  fsid=$(new_uuid)
  conf=$dir/ceph.conf
  mkdir -p "$dir"/{mon,osd,rgw,run,log}
  cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
mon initial members = a
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms mon client mode = crc
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
osd objectstore = memstore
memstore device bytes = 4294967296
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
keyring = $dir/keyring
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd
osd journal size = 0
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$port
rgw data = $dir/rgw
rgw dns name = localhost
keyring = $dir/rgw/keyring
CONF
  local C=(-c "$conf")
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
  ceph-mon "${C[@]}" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
  ceph-mon "${C[@]}" -i a
  local osd osd_uuid
  osd_uuid=$(new_uuid)
  osd=$(ceph "${C[@]}" osd create "$osd_uuid")
  ceph-osd "${C[@]}" -i "$osd" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1
  # A fresh OSD can ask the monitor before it has the monitor map ("wrong fsid"): retry.
  local tries=0
  until ceph-osd "${C[@]}" -i "$osd" 2>>"$dir/log/osd-start.err"; do
    tries=$((tries + 1))
    [ "$tries" -lt 5 ] || { echo "s3-server: ceph-osd would not start (see $dir/log)" >&2; exit 1; }
    sleep 1
  done
  ceph "${C[@]}" auth get-or-create client.rgw.a osd 'allow rwx' mon 'allow rw' -o "$dir/rgw/keyring"
  radosgw "${C[@]}" -n client.rgw.a
  key=dtmtestaccesskey
  secret=dtmtestsecretkey0000000000000000
  for _ in $(seq 120); do
    if radosgw-admin "${C[@]}" user create --uid dtm-test --display-name "dtm test" \
        --access-key "$key" --secret "$secret" >/dev/null 2>&1 \
      || radosgw-admin "${C[@]}" user info --uid dtm-test >/dev/null 2>&1; then
      break
    fi
    sleep 0.5
  done
  for _ in $(seq 120); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.5
  done
  curl -s -o /dev/null "http://127.0.0.1:$port/" || { echo "s3-server: radosgw did not answer on port $port (logs in $dir/log)" >&2; exit 1; }
  cat >"$dir/env" <<ENV
export DTM_S3_ENDPOINT=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_DEFAULT_REGION=us-east-1
ENV
  cat "$dir/env"
}

stop() {
  local dir=${1:?stop needs DIR}
  for pidfile in "$dir"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  for pidfile in "$dir"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

case "$cmd" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) echo "usage: s3-server.sh install|start DIR [PORT]|stop DIR" >&2; exit 2 ;;
esac
