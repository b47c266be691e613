"""How the maths runs on a device: the backend policy, the CPU kernels, chunked network calls,
memory planning and sharding over devices and hosts."""
