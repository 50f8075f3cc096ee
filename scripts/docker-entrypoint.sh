#!/bin/sh
# The container's entrypoint: runs `edgenode "$@"` (the image's CMD is `serve`) as the
# unprivileged `edgenode` user.
#
# The daemon never runs as root. A platform that starts the container as root with a fresh,
# root-owned volume on /data/models (Fly.io does: its volumes cannot be mounted with another
# owner) gets the store folder handed to `edgenode` first, then the privileges dropped with
# setpriv. Started as any other user (`docker run --user 10001:10001`), it goes straight to
# the daemon. Either way the daemon fetches missing models into the store with pip and
# verifies every file against the sha256 digests of the manifest built into the binary
# before it loads it; nothing in the image is trusted without a digest.
set -eu

store="${EDGENODE_STORE__DIR:-/data/models}"

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$store"
    # Only what is not already ours: the mount point itself, or files an earlier root run
    # left behind. The store holds a handful of files, so this is quick.
    find "$store" -xdev ! -user edgenode -exec chown edgenode:edgenode {} +
    exec setpriv --reuid=edgenode --regid=edgenode --init-groups --no-new-privs -- /usr/local/bin/edgenode "$@"
fi

exec /usr/local/bin/edgenode "$@"
