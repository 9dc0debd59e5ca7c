#!/usr/bin/env bash
# Adds bookworm-backports as an apt source, derived from the machine's own Debian source
# (same mirror URI, same keyring), so the repo never names a mirror itself. Idempotent.
set -euo pipefail
out=/etc/apt/sources.list.d/vmm-backports.sources
[ -e "$out" ] && exit 0
uri=""; keyring=""
if [ -e /etc/apt/sources.list.d/debian.sources ]; then
  # deb822: take the stanza whose Suites has plain "bookworm".
  uri=$(awk '/^URIs:/{u=$2} /^Suites:/{for(i=2;i<=NF;i++) if($i=="bookworm") {print u; exit}}' /etc/apt/sources.list.d/debian.sources)
  keyring=$(awk '/^Signed-By:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$uri" ] && [ -e /etc/apt/sources.list ]; then
  uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
fi
if [ -z "$uri" ]; then
  echo "apt-backports: cannot find a bookworm source in /etc/apt to derive bookworm-backports from" >&2
  exit 1
fi
{
  echo "Types: deb"
  echo "URIs: $uri"
  echo "Suites: bookworm-backports"
  echo "Components: main"
  [ -n "$keyring" ] && echo "Signed-By: $keyring"
} > "$out"
echo "apt-backports: added bookworm-backports from $uri"
