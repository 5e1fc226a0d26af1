"""What the rig boots, fetched from Debian or built, cached by content: kernels (Debian's, or built
from source with a series), L1's userspace, initramfs images, the guest workloads, L2's module."""
