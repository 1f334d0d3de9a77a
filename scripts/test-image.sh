#!/usr/bin/env bash
# Makes the local container image the tests and the examples use,
# `localhost/suanwang-test-busybox:latest`: Debian's static busybox and its
# applets, imported into podman's store from a local root file system (no
# registry, nothing downloaded). Idempotent; run as root.
#   needs: apt-get install podman runc busybox-static
set -euo pipefail
name="${1:-suanwang-test-busybox}"
if podman image exists "$name"; then
    exit 0
fi
busybox=$(command -v busybox || true)
[ -x "$busybox" ] || { echo "test-image: busybox is not installed (apt-get install busybox-static)" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then
    echo "test-image: $busybox is dynamically linked; the image needs a static one (apt-get install busybox-static)" >&2
    exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/work"
# As in any distribution's image: a container's /tmp keeps the image's mode.
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
tar -C "$root" -cf - . | podman import --quiet --change 'ENV PATH=/bin' - "$name" >/dev/null
echo "test-image: made $name"
