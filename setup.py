"""realm_jax: REALM retrieval-augmented pretraining in JAX/Flax."""

import setuptools

# Ranges, not pins, so that the package co-installs with other JAX stacks: the lower bound is
# the tested release, the upper bound the next release line that may break the API. The exact
# tested set lives in constraints.txt (`make` installs with `pip install -c constraints.txt`).
# jax >= 0.11 needs Python 3.12, hence python_requires below.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "scann>=1.4.2,<1.5",
    "ml-collections>=1.1.0,<2",
    "grain>=0.2.18,<0.3",
    "tokenizers>=0.23.3,<0.24",
    "etils[epath]>=1.15.0,<2",
    "absl-py>=2.5.1,<3",
    "numpy>=2.0,<2.5",
    "tensorboardX>=2.6.5,<3",
    "safetensors>=0.8.0,<0.9",  # pretrained BERT weights (models/hf_weights.py)
    # BM25 side of the core `--mode=eval_retrieval` (retrieval/evaluation.py): a small pure-Python
    # package whose only dependency (numpy) is already here, so core rather than an extra.
    "bm25s>=0.3.16,<0.4",
    # The figure `make demo` writes (realm_jax/plots.py).
    "matplotlib>=3.11.2,<4",
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
        "test": ["pytest>=9.2.0,<10", "pytest-xdist>=3.8.0,<4"],
        # `.venv/bin/tensorboard --logdir <workdir>/metrics` (the trainer writes the events with
        # tensorboardX, which needs no TensorFlow; neither does the TensorBoard server).
        "tensorboard": ["tensorboard>=2.21.0,<3"],
        # `--config.data.source=tfds:...` (data/wiki_corpus.py), ~200 MB of dependencies. Reading
        # a prepared dataset needs no TensorFlow; `tfds build` of Wikipedia does (README).
        "tfds": ["tensorflow-datasets>=4.9.10,<5"],
        # TPU VMs (launch/): libtpu for jax 0.10.2; also compiles for a named TPU topology on a
        # CPU host (jax.experimental.topologies; `--mode=compile`, realm_jax/train/aot.py).
        # jax 0.10.2's own extra pins libtpu==0.0.42.* (0.0.42.1 tested, 2026-12-02).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # gs:// workdirs and corpora through etils.epath (gcsfs), without TensorFlow.
        "gcs": ["etils[epath-gcs]>=1.15.0,<2"],
        # Kept for old install commands: bm25s is a core dependency now.
        "experiments": [],
        # spaCy NER for salient spans; also install the en_core_web_sm wheel (README).
        "ner": ["spacy>=3.7.5,<3.9"],
    },
)
