import logging
import warnings

# On a CPU with AVX512-BF16, bitsandbytes tries on import to fetch a kernel from the Hugging Face hub
# and logs a warning when it cannot. Nothing is fetched at run time here, and its fallback is the one
# apprentice uses: that one notice is dropped, every other bitsandbytes message stays.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

# TRL 1.16 and PEFT still read the model attribute transformers 5.24 renamed (is_gradient_checkpointing):
# their warning, on every adapter load and training run, is theirs to fix.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
