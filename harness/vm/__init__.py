"""VM plumbing: QEMU machines and their lifecycle, serial consoles, QMP, the devices assigned to L1,
L2's command line, the accelerator, and the rig that stands L1 and L2 up."""
