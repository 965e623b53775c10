#!/usr/bin/env bash
# Builds the vmft guest image (kernel + initramfs) from Debian packages and
# caches it outside the repository, keyed by a hash of every input.
#
# Usage: guest-images/build.sh [--print-key]
# Prints, on stdout:  kernel=<path to vmlinux>  initrd=<path to cpio>
# (the same kernel as a bzImage is beside the vmlinux, named bzImage)
# Everything else goes to stderr. Environment:
#   VMFT_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/vmft)
#   VMFT_JOBS        make -j (default: nproc)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${VMFT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmft}"
jobs="${VMFT_JOBS:-$(nproc)}"
mkdir -p "$cache/debs"

log() { printf '[guest-images] %s\n' "$*" >&2; }
die() { printf '[guest-images] error: %s\n' "$*" >&2; exit 1; }

# One build at a time per cache (tests may call this in parallel).
exec 9>"$cache/.lock"
flock 9

need_tools() {
    local missing=()
    for t in flex bison bc cpio make gcc perl xz patch; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ -e /usr/include/libelf.h ] || missing+=("libelf-dev")
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing build tools (missing: ${missing[*]})"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq >&2 || true
        $sudo apt-get install -y -qq flex bison bc cpio make gcc perl xz-utils patch libelf-dev libssl-dev >&2 \
            || die "could not install kernel build tools (flex bison bc cpio libelf-dev)"
    fi
}

# Fetch a package into the cache unless some version of it is already there.
fetch_deb() {
    local pkg="$1" f
    f="$(ls "$cache/debs/${pkg}_"*.deb 2>/dev/null | sort | tail -n1 || true)"
    if [ -z "$f" ]; then
        log "downloading $pkg with apt-get download"
        (cd "$cache/debs" && apt-get download "$pkg" >&2 2>/dev/null) \
            || (cd "$cache/debs" && apt-get update -qq >&2 && apt-get download "$pkg" >&2) \
            || die "apt-get download $pkg failed"
        f="$(ls "$cache/debs/${pkg}_"*.deb | sort | tail -n1)"
    fi
    printf '%s\n' "$f"
}

hash_files() { cat "$@" | sha256sum | cut -c1-16; }

kernel_deb="$(fetch_deb linux-source-6.1)"
busybox_deb="$(fetch_deb busybox-static)"

kernel_key="$( { sha256sum "$kernel_deb" | cut -d' ' -f1; cat "$here/kernel/vmft.config" "$here"/kernel/*.patch "$here/build.sh"; } | sha256sum | cut -c1-16)"
initrd_key="$( { sha256sum "$busybox_deb" | cut -d' ' -f1; cd "$here/initramfs" && find . -type f | LC_ALL=C sort | xargs cat; cat "$here/build.sh"; } | sha256sum | cut -c1-16)"

kernel_out="$cache/kernel-$kernel_key"
initrd_out="$cache/initramfs-$initrd_key"

if [ "${1:-}" = "--print-key" ]; then
    echo "kernel_key=$kernel_key"
    echo "initrd_key=$initrd_key"
    exit 0
fi

build_kernel() {
    need_tools
    local work="$cache/build-kernel-$kernel_key"
    rm -rf "$work"; mkdir -p "$work"
    log "unpacking $(basename "$kernel_deb")"
    dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$work" ./usr/src/
    local tarball
    tarball="$(ls "$work"/usr/src/linux-source-6.1.tar.* | head -n1)"
    tar -xf "$tarball" -C "$work"
    rm -rf "$work/usr"
    local src="$work/linux-source-6.1"
    [ -d "$src" ] || die "kernel source tree not found in $kernel_deb"
    local p
    for p in "$here"/kernel/*.patch; do
        log "applying $(basename "$p")"
        patch -d "$src" -p1 --forward --quiet < "$p" \
            || die "$(basename "$p") does not apply to $(basename "$kernel_deb")"
    done
    log "configuring (tinyconfig + kernel/vmft.config)"
    make -C "$src" -s tinyconfig >&2
    (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$here/kernel/vmft.config" >/dev/null)
    make -C "$src" -s olddefconfig >&2
    # Fail loudly if kconfig dropped something the monitor depends on.
    local opt
    for opt in CONFIG_64BIT=y CONFIG_SERIAL_8250_CONSOLE=y CONFIG_BLK_DEV_INITRD=y \
               CONFIG_VIRTIO_MMIO=y CONFIG_VIRTIO_BLK=y CONFIG_VIRTIO_NET=y CONFIG_EXT2_FS=y \
               CONFIG_DEVTMPFS=y CONFIG_BINFMT_ELF=y; do
        grep -qx "$opt" "$src/.config" || die "kernel config lacks $opt after olddefconfig"
    done
    for opt in CONFIG_SMP CONFIG_MODULES CONFIG_PARAVIRT CONFIG_IA32_EMULATION CONFIG_RELOCATABLE; do
        if grep -q "^$opt=y" "$src/.config"; then die "kernel config has $opt=y"; fi
    done
    log "building vmlinux and bzImage with make -j$jobs (a few minutes)"
    local start=$SECONDS
    make -C "$src" -j"$jobs" -s vmlinux bzImage >&2 || die "kernel build failed (tree kept at $src)"
    log "kernel built in $((SECONDS - start)) s"
    mkdir -p "$kernel_out.tmp"
    cp "$src/vmlinux" "$kernel_out.tmp/vmlinux"
    cp "$src/arch/x86/boot/bzImage" "$kernel_out.tmp/bzImage"
    strip --strip-debug "$kernel_out.tmp/vmlinux" 2>/dev/null || true
    cp "$src/.config" "$kernel_out.tmp/config"
    basename "$kernel_deb" > "$kernel_out.tmp/source-package"
    rm -rf "$kernel_out"; mv "$kernel_out.tmp" "$kernel_out"
    rm -rf "$work"
}

build_initrd() {
    command -v cpio >/dev/null 2>&1 || need_tools
    local work="$cache/build-initrd-$initrd_key"
    rm -rf "$work"; mkdir -p "$work/pkg" "$work/root"
    dpkg-deb -x "$busybox_deb" "$work/pkg"
    local root="$work/root" bb="$work/pkg/bin/busybox"
    [ -x "$bb" ] || die "busybox binary not found in $busybox_deb"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root}
    cp "$bb" "$root/bin/busybox"
    local applet
    for applet in $("$bb" --list-full); do
        [ "$applet" = "bin/busybox" ] && continue
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
    cp "$here/initramfs/init" "$root/init"
    cp -r "$here/initramfs/workloads" "$root/workloads"
    chmod 0755 "$root/init" "$root"/workloads/*
    # Reproducible archive: fixed order, owner and timestamps.
    find "$root" -exec touch -h -d @0 {} +
    mkdir -p "$initrd_out.tmp"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --owner 0:0 --reproducible --quiet) \
        > "$initrd_out.tmp/initramfs.cpio"
    rm -rf "$initrd_out"; mv "$initrd_out.tmp" "$initrd_out"
    rm -rf "$work"
}

[ -f "$kernel_out/vmlinux" ] || build_kernel
[ -f "$initrd_out/initramfs.cpio" ] || build_initrd

echo "kernel=$kernel_out/vmlinux"
echo "initrd=$initrd_out/initramfs.cpio"
