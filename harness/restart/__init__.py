"""The fast restart under test: the flow's steps, the restart modes, the faults injected into it,
the checks that judge it, and the capability probes that decide what can run."""
