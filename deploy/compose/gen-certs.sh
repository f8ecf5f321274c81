#!/bin/sh
# Makes what compose.yaml mounts from ./certs: a CA, certificates for the two
# controllers and two agents, and the secrets key both controllers share, owned by the
# image's user `baton`. Then, once Postgres is up, the first admin token:
#   docker-compose run --rm controller-1 baton-controller bootstrap > certs/admin.token
set -eu
cd "$(dirname "$0")"
mkdir -p certs
docker run --rm -u 0 -v "$PWD/certs:/certs" --entrypoint sh baton:latest -c '
  set -eu
  baton certs ca --dir /certs
  for c in controller-1 controller-2; do
    baton certs issue --dir /certs --role controller --name "$c" --host "$c" --host localhost --host 127.0.0.1
  done
  for a in agent-1 agent-2; do
    baton certs issue --dir /certs --role agent --name "$a"
  done
  head -c 32 /dev/urandom | base64 > /certs/secrets.key
  chmod 600 /certs/secrets.key
  chown -R baton /certs
'
