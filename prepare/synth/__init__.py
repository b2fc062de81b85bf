"""Synthetic face-like identities written in the insightface layout.

No real face data set can be downloaded where this project is built and tested,
so the demo, the tests and the benchmarks run on procedurally drawn faces. Each
identity is a set of stable traits (head shape, skin tone, hair, eyes, brows,
nose, mouth, glasses, beard, moles, ...) sampled from its own RNG; each image of
it varies pose, expression, lighting, blur, noise, JPEG quality, occlusion and
background. Telling identities apart has to be learnt (an untrained CNN
verifies poorly) yet the traits survive the nuisances, so a trained model
generalises to identities it never saw.

Images are RGB uint8, 112x112, aligned like insightface crops (eyes near
(38, 51.7) and (73.5, 51.5), nose tip near (56, 71.7), mouth corners near
(41.5, 92.4) and (70.7, 92.2)). They are drawn at 2x with anti-aliasing and
shrunk with INTER_AREA. Every image's RNG is derived from
(seed, set, identity, image index), so output bytes depend only on the
arguments, never on the number of worker processes.

ijb.py writes a small IJB-B/IJB-C set of held-out identities in the release layout
(loose crops, 5 points, faceness, media, templates, pairs, 1:N galleries).

Units: pose angles in degrees; lengths in pixels of the 112x112 frame.
"""

from prepare.synth.dataset import (
                                SET_CHARACTER,
                                TRAIN_TURNED,
                                VERIFICATION_PAIRS,
                                dataset_jobs,
                                generate_dataset,
                                identity_traits,
                                lookalike_keep,
                                pair_count,
                                render_job,
)
from prepare.synth.ijb import generate_ijb, ijb_pairs, ijb_plan, render_crop, render_loose
from prepare.synth.render import SIZE, render_face
from prepare.synth.traits import age_traits, lookalike_traits, render_identity_traits

__all__ = ["SET_CHARACTER", "SIZE", "TRAIN_TURNED", "VERIFICATION_PAIRS", "age_traits", "dataset_jobs",
           "generate_dataset", "generate_ijb", "identity_traits", "ijb_pairs", "ijb_plan", "lookalike_keep",
           "lookalike_traits", "pair_count", "render_crop", "render_face", "render_identity_traits", "render_job",
           "render_loose"]
