"""Size a job before paying for it: `python -m t5x_like.plan --config=configs/llama_1b.py
--topology=v5p-8 [--config.mesh.tensor=2 ...]`.

The entry point only: the job is t5x_like/experiments/plan.py.
"""

if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    import os
    import sys

    from absl import flags

    # plan.py imports JAX only inside main, so the fake device count is set before it starts.
    from t5x_like.experiments.plan import TOPOLOGIES, main, target_devices

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={target_devices(sys.argv)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from ml_collections import config_flags

    from t5x_like.core import cli

    config_flags.DEFINE_config_file("config", None, "Job config file (configs/*.py).")
    flags.DEFINE_string("topology", "custom", f"One of {', '.join(TOPOLOGIES)} or custom "
                        "(then --devices, --hbm_gib, --peak_tflops).")
    flags.DEFINE_integer("devices", 8, "Devices of a custom topology.")
    flags.DEFINE_float("hbm_gib", 80.0, "Memory per device of a custom topology.")
    flags.DEFINE_float("peak_tflops", 989.0, "Peak TFLOP/s per device of a custom topology.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilization assumed for the step time.")
    flags.DEFINE_bool("compile", True, "Compile the train step for XLA's memory analysis.")
    cli.run(main)
