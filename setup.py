"""realm_jax: REALM retrieval-augmented pretraining in JAX/Flax."""

import setuptools

# Pinned to versions that install together on Python 3.11 (jax >= 0.11 needs Python 3.12).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "scann==1.4.2",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "grain==0.2.18",
    "tokenizers==0.23.3",
    "etils[epath]==1.15.0",
    "absl-py==2.5.1",
    "numpy>=2.0,<2.5",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "safetensors==0.8.0",  # pretrained BERT weights (models/hf_weights.py)
]

setuptools.setup(
    name="realm_jax",
    version="0.1.0",
    description="REALM (retrieval-augmented language model pretraining) in JAX/Flax",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["realm_jax", "realm_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "bm25s==0.3.16"],
        # BM25 baseline of the experiments (EXPERIMENTS.md).
        "experiments": ["bm25s==0.3.16"],
        # spaCy NER for salient spans; also install the en_core_web_sm wheel (README).
        "ner": ["spacy>=3.7.5,<3.9"],
    },
)
