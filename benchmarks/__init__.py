"""samat's benchmarks: speed and memory as ratios measured in one run (`python -m benchmarks`),
and the GPU check that runs a small grid end to end on a GPU (`python -m benchmarks.gpu_check`).

Modules: clock (synchronised timing, random data), figures (reporting), step_cost (methods vs SGD
and vs their floors), loader (DeviceLoader vs DataLoader), autoattack_compare (samat vs the
official AutoAttack), scale (CLI speed on many runs), epoch (training throughput per precision).
"""
