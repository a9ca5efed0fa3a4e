#!/usr/bin/env bash
# Create the PostgreSQL role and database of a latentpacs archive, bring its schema to
# head, and print the archive URL for archive.database (LATENTPACS_ARCHIVE_DATABASE).
#
# Usage: postgres-setup.sh [DATABASE] [ROLE]      (defaults: latentpacs latentpacs)
# Runs psql as the PostgreSQL superuser: by default `sudo -u postgres psql` over the local
# socket; set PGHOST/PGPORT/PGUSER (and PSQL="psql") to reach another server instead.
# LATENTPACS_HOST is the host name nodes use to reach the server (default: PGHOST or
# localhost). The role's password is generated here and appears only in the printed URL:
# keep it in the node's configuration file (mode 0640, owner latentpacs) or environment.
# Running it again keeps the role and database and sets a new password.
set -euo pipefail

database="${1:-latentpacs}"
role="${2:-latentpacs}"
psql_cmd="${PSQL:-sudo -u postgres psql}"
node_host="${LATENTPACS_HOST:-${PGHOST:-localhost}}"
node_port="${PGPORT:-5432}"

for name in "$database" "$role"; do
    if [[ ! "$name" =~ ^[a-z_][a-z0-9_]*$ ]]; then
        echo "postgres-setup.sh: '$name' must be a lower-case SQL identifier" >&2
        exit 2
    fi
done

password="$(openssl rand -hex 24)"

$psql_cmd -v ON_ERROR_STOP=1 -q -d postgres \
    -v role="$role" -v database="$database" -v password="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', :'database', :'role', 'UTF8')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'database') \gexec
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT ALL ON DATABASE :"database" TO :"role";
SQL

url="postgresql+psycopg://${role}:${password}@${node_host}:${node_port}/${database}"
if command -v latentpacs >/dev/null 2>&1; then
    latentpacs db upgrade --database "$url" >&2
fi
echo "$url"
