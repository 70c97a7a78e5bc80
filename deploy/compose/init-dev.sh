#!/bin/sh
# DEVELOPMENT ONLY: the compose demo network's one-shot set-up (the `init` service runs it).
# Writes, once, into the shared volumes: development certificates (a throwaway CA), a development
# token signing key, and a synthetic registry per site. A later `docker compose up` keeps them.
set -eu

if [ ! -f /etc/gateway/certs/dev-ca.pem ]; then
  gateway certs dev --out /etc/gateway/certs --sites north,south,east,west --broker broker
fi
if [ ! -f /etc/gateway/keys/dev-signing-key.pub.pem ]; then
  gateway token keygen --out /etc/gateway/keys
fi
for site in north south east west; do
  if [ ! -f "/srv/gateway/data/$site.duckdb" ]; then
    gateway data synth --site "$site" --patients "${PATIENTS:-20000}" --out "/srv/gateway/data/$site.duckdb"
  fi
done
# the servers run as the image's user 10001, and only it reads the keys
chown -R 10001:10001 /etc/gateway/certs /etc/gateway/keys /srv/gateway/data
