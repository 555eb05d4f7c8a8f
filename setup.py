"""dsembed: turn decoder LLMs into text-embedding models; the pooling-and-attention study."""
from setuptools import find_packages, setup

setup(
    name="dsembed",
    version="0.1.0",
    description="Fine-tune decoder LLMs into embedding models with DeepSpeed; pooling/attention study",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dsembed", "dsembed.*"]),
    include_package_data=True,
    # DeepSpeed templates live at the top level (ds_configs/); wheels carry them to <prefix>/share/dsembed.
    data_files=[("share/dsembed/ds_configs", ["ds_configs/zero2.json", "ds_configs/zero3.json", "ds_configs/zero3_offload.json"])],
    # torch is pinned by the install command (constraints.txt); a range here keeps GPU users free.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "deepspeed>=0.17",
        "mteb>=2.0,<3",
        "sentence-transformers>=5.0",
        "pyyaml>=6",
        "tensorboard>=2.15",
        "scipy>=1.10",
        "statsmodels>=0.14",
        "scikit-learn>=1.3",
        "numpy>=1.24",
        "safetensors>=0.4",
        "gguf>=0.10",
        "matplotlib>=3.7",
        "ninja",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "demo": ["chatterbot-corpus>=1.2", "gensim>=4.3"],
        "dev": ["pytest>=8", "chatterbot-corpus>=1.2", "gensim>=4.3"],
    },
    entry_points={
        "console_scripts": [
            "dsembed-train=dsembed.train:cli",
            "dsembed-consolidate=dsembed.cli.consolidate:cli",
            "dsembed-evaluate=dsembed.cli.evaluate:cli",
            "dsembed-compare=dsembed.cli.compare:cli",
            "dsembed-study=dsembed.cli.study:cli",
            "dsembed-demo=dsembed.cli.demo:cli",
            "dsembed-bench=dsembed.cli.bench:cli",
            "dsembed-probe-layers=dsembed.cli.probe_layers:cli",
            "dsembed-mine=dsembed.cli.mine:cli",
            "dsembed-dims=dsembed.cli.dims:cli",
        ]
    },
)
