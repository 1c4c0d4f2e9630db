"""Language models in textrl: loading (``models``), the actor-critic (``policy``), KV-cached decoding
(``decoding``), token sampling (``sampling``), the generator protocol (``generate``), collecting a rollout
from a text env (``collect``), building a run's pieces (``build``), held-out evaluation (``evaluate``),
run reports (``report``) and the LM run itself (``run``)."""
