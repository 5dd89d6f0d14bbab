"""Defaults of the TEE-only runner (everything on the CPU). Every one is a flag too."""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

MODEL = "default"            # checkpoint directory, "default" (SmolLM2-135M-Instruct) or "preset:NAME"
PREFILL_TOKEN_LENGTH = 8     # tokens per sequence
BATCH_SIZE = 1
GPU_DEVICE = "cuda:0"        # accepted for a uniform command line; this runner never uses a GPU
CPU_DEVICE = "cpu"           # the TEE
DTYPE = "float32"            # float32 or bfloat16 are the usual choices on a CPU
SEED = None                  # this runner draws no masks; accepted for a uniform command line
WEIGHTS_SEED = 0             # seed of a preset's random weights, the same for every runner
WARMUP = 0                   # 0: the first inference is the one timed
REPEAT = 0                   # extra inferences for steady-state statistics
ATTENTION = "auto"           # "one-block", "causal-blocks", "fused", or "auto": the fastest, timed on this CPU in set-up
KERNELS = None               # the TEE's kernels: "compiled" (inductor, in set-up), "cpp" (eager ops and C++ kernels), "eager", or None: compiled with CUDA, cpp without
OUTPUT_FILE = "tee_only_results.json"
PROMPTS_FILE = os.path.join(_HERE, "prompts.txt")
