# Sourced (`. scripts/aarch64-env.sh` from the repository root) before cross-building
# aarch64-unknown-linux-gnu on x86-64 Debian 12 after `scripts/install-deps.sh --aarch64`;
# scripts/test-aarch64.sh sources it too, so docs/install.md's commands are CI's.
#
# Environment variables rather than a .cargo/config.toml: they name this host's multiarch
# paths and the pkg-config files install-deps.sh unpacked under target/, and a
# [target.aarch64-unknown-linux-gnu] linker in the repository would also apply to a native
# build on the Jetson, which has no aarch64-linux-gnu-gcc.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# libc6:arm64 puts the arm64 loader at /lib/ld-linux-aarch64.so.1 and the libraries in
# /usr/lib/aarch64-linux-gnu, so qemu needs no -L sysroot (the cross toolchain's libc in
# /usr/aarch64-linux-gnu is another build of glibc, which must not mix with the multiarch one).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
# pkg-config of the target only (host build scripts keep the x86 files): the multiarch .pc
# files and those of libgstreamer-plugins-base1.0-dev:arm64 (unpacked, see install-deps.sh).
export PKG_CONFIG_ALLOW_CROSS=1
export PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu="$PWD/target/aarch64-linux-gnu-dev/pkgconfig:/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig"
# Under qemu the arm64 libgstreamer would fork its arm64 gst-plugin-scanner, which the kernel
# cannot exec without binfmt: it scans the plugins in the emulated process instead.
export GST_REGISTRY_FORK=no
