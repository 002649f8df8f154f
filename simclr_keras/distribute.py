"""Strategy construction: the one place that picks a tf.distribute strategy.

Everything else (the model's train_step, NT-Xent's cross-replica gather, synchronized BatchNorm) is
the same code under every strategy; only `make_strategy` knows which one runs.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
# CPU features with native bfloat16 arithmetic (oneDNN uses them for bfloat16 convolutions and matmuls).
_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def split_host_cpu(num_devices):
    """Splits the host CPU into `num_devices` logical devices (call before TensorFlow uses a device).

    This is how multi-replica code runs, and is tested, on a CPU-only machine: MirroredStrategy over
    N logical CPUs behaves like N accelerators (separate batches, all-reduce, all-gather).
    """
    if num_devices < 2:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as error:  # devices already initialised: only a fresh process can split
        current = len(tf.config.list_logical_devices("CPU"))
        if current != num_devices:
            raise ValueError(
                f"cpu_replicas={num_devices} must be set before TensorFlow initialises its devices "
                f"(this process already has {current} CPU devices)."
            ) from error


def make_strategy(name="default", tpu_address=None, cpu_replicas=0):
    """Returns the tf.distribute.Strategy called `name`.

    - "default": no distribution (one device).
    - "mirrored": synchronous replicas on this machine's GPUs, or on `cpu_replicas` logical CPUs
      when there are no GPUs.
    - "multi_worker": MultiWorkerMirroredStrategy over the workers listed in the TF_CONFIG
      environment variable (each worker runs the same command), with each worker's GPUs or
      `cpu_replicas` logical CPUs.
    - "tpu": TPUStrategy on the TPU at `tpu_address` ("" or None: the TPU of this VM, or the one in
      the TPU_NAME environment variable).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {name!r}.")
    if cpu_replicas < 0 or cpu_replicas == 1:
        raise ValueError(f"cpu_replicas must be 0 (off) or >= 2, got {cpu_replicas}.")
    if name == "default":
        if cpu_replicas:
            raise ValueError("cpu_replicas needs --strategy=mirrored or multi_worker.")
        return tf.distribute.get_strategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)

    split_host_cpu(cpu_replicas)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy=multi_worker needs the TF_CONFIG environment variable (see docs/scaling.md).")
        # RING all-reduce works on CPUs and GPUs; NCCL is picked automatically only for GPUs.
        communication = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)
    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if not devices:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def _onednn_allows_bfloat16(environ):
    """False where oneDNN is off or capped below its native bfloat16 kernels (ONEDNN_MAX_CPU_ISA):
    bfloat16 is then computed by emulation, several times slower than float32."""
    if environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        return False
    cap = environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return cap in ("ALL", "DEFAULT", "") or any(name in cap for name in ("BF16", "FP16", "AMX", "AVX10"))


def cpu_has_bfloat16(cpuinfo_path="/proc/cpuinfo", environ=os.environ):
    """Whether this CPU computes in bfloat16 natively (AVX512_BF16 or AMX) and oneDNN may use it;
    False where it cannot tell."""
    if not _onednn_allows_bfloat16(environ):
        return False
    try:
        with open(cpuinfo_path, encoding="utf-8") as file:
            for line in file:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _BFLOAT16_CPU_FLAGS)
    except OSError:  # not Linux
        pass
    return False


def resolve_precision(precision, strategy):
    """The Keras dtype policy for `precision`; "auto" picks the fastest one for the hardware.

    "auto": mixed_bfloat16 on TPU and on CPUs with native bfloat16 (AVX512_BF16 / AMX), where it is
    faster than float32 (BENCHMARKS.md); mixed_float16 on GPUs (Keras then scales the loss);
    float32 elsewhere. Other values are returned as they are.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    if precision != "auto":
        return precision
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    if tf.config.list_logical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"


def is_chief(strategy):
    """Whether this process writes the run's outputs (always, except on non-chief multi-worker workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    has_chief = "chief" in json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
