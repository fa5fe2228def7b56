"""A tiny stock Concordia (gdm-concordia 2.4.0) simulation, unmodified apart from its base URL.

Two ``basic__Entity`` players and a ``dialogic__GameMaster`` that picks who speaks next (its
``game_master_choice`` acting order: a multiple-choice question to the model, Concordia's
``sample_choice``) play a few steps on Concordia's own OpenAI wrapper
(``GptLanguageModel``, the ``openai`` client reading ``OPENAI_BASE_URL``). Concordia asks a
multiple-choice question as a plain prompt ending in "Respond EXACTLY with one of the following
strings:" and the option letters, and resamples up to 20 times until the reply is exactly one
of them; the server holds such replies to an option when ``serve.choice_prompts`` names that
phrase (``make realclient-concordia`` sets it).

The only other choice is the sentence embedder Concordia's memory needs: a hashed bag of words
(numpy, offline), since the point is the language model. Exits 0 once the simulation ran its
steps. Run with the Concordia venv's Python: ``python concordia_village.py BASE_URL [--steps N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np


def embed(text: str) -> np.ndarray:
    """A 64-dimensional hashed bag of words, L2-normalised."""
    v = np.zeros(64)
    for word in text.lower().split():
        v[int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
    return v / (np.linalg.norm(v) or 1.0)


def main(args: argparse.Namespace) -> int:
    os.environ["OPENAI_BASE_URL"] = args.base_url
    os.environ.setdefault("OPENAI_API_KEY", "not-needed")
    import concordia
    import concordia.prefabs.entity as entity_prefabs
    import concordia.prefabs.game_master as game_master_prefabs
    from concordia.contrib.language_models.openai.gpt_model import GptLanguageModel
    from concordia.prefabs.simulation import generic as simulation
    from concordia.typing import prefab as prefab_lib
    from concordia.utils import helper_functions

    model = GptLanguageModel(model_name="smollm2-135m")
    prefabs = {**helper_functions.get_package_classes(entity_prefabs),
               **helper_functions.get_package_classes(game_master_prefabs)}
    instances = [
        prefab_lib.InstanceConfig(prefab="basic__Entity", role=prefab_lib.Role.ENTITY,
                                  params={"name": "Alice", "goal": "sell her bread"}),
        prefab_lib.InstanceConfig(prefab="basic__Entity", role=prefab_lib.Role.ENTITY,
                                  params={"name": "Bob", "goal": "buy bread for dinner"}),
        prefab_lib.InstanceConfig(prefab="dialogic__GameMaster",
                                  role=prefab_lib.Role.GAME_MASTER,
                                  params={"name": "conversation rules",
                                          "next_game_master_name": "conversation rules",
                                          "acting_order": "game_master_choice",
                                          "can_terminate_simulation": False}),
    ]
    config = prefab_lib.Config(
        default_premise="Alice, a baker, and Bob, a blacksmith, meet at the village market.",
        default_max_steps=args.steps, prefabs=prefabs, instances=instances)
    t0 = time.monotonic()
    sim = simulation.Simulation(config=config, model=model, embedder=embed)
    log = sim.play(max_steps=args.steps)
    entries = getattr(log, "entries", None) or getattr(log, "_entries", None) or []
    print(f"concordia {getattr(concordia, '__version__', '2.x')}: {args.steps} steps in "
          f"{time.monotonic() - t0:.0f} s; {len(entries)} log entries", flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base_url")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workdir", default=None, help="unused (run.py passes one)")
    sys.exit(main(p.parse_args()))
