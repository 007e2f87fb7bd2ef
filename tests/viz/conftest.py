"""One tiny llama and its pictures, shared by the viz tests (capture costs about a second)."""

import pytest

SPEC = """adapter default = lora(r=8, alpha=16, dropout=0.1) {
    target @attn.q, @attn.v
    rank 4 on layers[1]
}
"""


@pytest.fixture(scope="package")
def llama():
    from surgeon.models.load import load_model

    return load_model("tiny:llama").model


@pytest.fixture(scope="package")
def picture(llama):
    import surgeon

    return surgeon.viz(llama, SPEC)
