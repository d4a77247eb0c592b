"""lit-gcpo: uncertainty-aware RL of language models on PyTorch Lightning (README, "Layout and architecture")."""

from lit_gcpo.moved import install as _install_moved_paths

_install_moved_paths()  # module paths of earlier versions keep importing (old checkpoints and configs)
