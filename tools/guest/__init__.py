"""The live-migration test guest: a Debian kernel and a busybox initramfs, built and cached."""
