"""Defaults shared by the three split runners (tee_runner_optimized/ours/otp.py). Every one is a flag too."""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

MODEL = "default"            # checkpoint directory, "default" (SmolLM2-135M-Instruct) or "preset:NAME"
PREFILL_TOKEN_LENGTH = 8     # tokens per sequence
BATCH_SIZE = 1
GPU_DEVICE = "cuda:0"        # the untrusted device; CPU fallback when CUDA is absent
CPU_DEVICE = "cpu"           # the TEE
DTYPE = None                 # None: float16 with CUDA, float32 without
SEED = None                  # None: masks drawn from the OS CSPRNG; an int makes them reproducible
WEIGHTS_SEED = 0             # seed of a preset's random weights, the same for every runner
WARMUP = 0                   # 0: the first inference is the one timed
REPEAT = 0                   # extra inferences for steady-state statistics
KERNELS = None               # the TEE's kernels: "compiled" (inductor, in set-up), "cpp" (eager ops and C++ kernels), "eager", or None: compiled with CUDA, cpp without
OUTPUT_FILE = "tee_gpu_results.json"
PROMPTS_FILE = os.path.normpath(os.path.join(_HERE, "..", "tee_only_llama", "prompts.txt"))  # the same prompts for every runner
OTP_PAD_SCALE = 1.0          # otp: pad std as a multiple of the padded tensor's RMS
MASK_RANK = 1                # ours: rank k of the token mixing in M = D + ABᵀ (1: the original D + αβᵀ)
MIX_SCALE = 1.0              # ours: size of the token mixing ABᵀX against DX
OVERLAP = False              # optimized: copies in parts, overlapping the TEE's work (CUDA; slower on the H100 machine, README "Overlap")
# the masked runners whose TEE keeps its own copy of a tied embedding table (the others read the GPU's whole at
# every inference, about 10 ms at the 1B shape): otp's host memory target (4 GiB) holds the 501 MiB, ours' (1.5) not
RESIDENT_EMBEDDING = ("otp",)
# "on", "off", or "auto": set-up times each way on this machine before the first inference and keeps the faster
FUSE_HOPS = "auto"           # ours, otp: recover, RMSNorm, SiLU, RoPE or softmax, and protect as one TEE call per hop (crypto then holds those ops); auto: with compiled or C++ kernels only
CUDA_GRAPHS = "auto"         # replay each GPU call from a CUDA graph captured in set-up (CUDA only; not yet measured on a GPU)
