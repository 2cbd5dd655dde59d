"""vLLM's ``--load-format fst``: installing fst registers it (entry point ``vllm.general_plugins``).

    vllm serve MODEL --load-format fst
    LLM(model, load_format="fst", model_loader_extra_config={"budget": 512 << 20})

Modules: ``plugin`` (the entry point: version check and registration, never raising),
``loader`` (``FstModelLoader``, a ``DefaultModelLoader`` whose safetensors fst reads; the only
module that imports vLLM at import time) and ``weights`` (fst's options and the weights
iterator, free of vLLM). Importing this package imports neither vLLM nor torch.
"""

LOAD_FORMAT = "fst"
# Under vLLM's "vllm" logger, whose handler and level vLLM configures in each of its processes:
# a logger outside it would drop the INFO lines.
LOGGER_NAME = "vllm.fst"
