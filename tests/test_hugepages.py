"""lsjax.native.hugepages: which regions it asks for, that the kernel really remaps them, that nothing changes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax import native
from lsjax.backends import native_backend
from lsjax.native import hugepages

MiB = 1 << 20


def test_regions_cover_every_touched_2mib_region_once():
    start = 10 * hugepages.REGION
    buffers = [(start + 100, 3 * MiB),  # touches regions 10 and 11
               (start + 3 * MiB, 1 * MiB),  # region 11 again
               (start + 8 * MiB - 1, 2)]  # straddles 13 | 14
    assert hugepages.regions(buffers) == [r * hugepages.REGION for r in (10, 11, 13, 14)]


def test_host_buffers_skip_small_and_deleted_arrays():
    big, small, gone = jnp.ones((MiB,), jnp.float32), jnp.ones((16,), jnp.float32), jnp.ones((MiB,), jnp.float32)
    gone.delete()
    found = hugepages.host_buffers({"big": big, "small": small, "gone": gone, "not_an_array": 3})
    assert found == [(big.unsafe_buffer_pointer(), big.nbytes)]


def _huge_kib_at(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    current = None
    for line in open("/proc/self/smaps"):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            current = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(hugepages.unavailable_reason() is not None, reason=str(hugepages.unavailable_reason()))
def test_collapse_remaps_onto_huge_pages_and_keeps_contents():
    values = np.random.default_rng(0).standard_normal(8 * MiB // 4).astype(np.float32)  # 8 MiB: 3+ whole regions
    x = jnp.asarray(values)
    address = x.unsafe_buffer_pointer()
    done = hugepages.collapse({"w": x})
    assert done >= 3 * hugepages.REGION  # the regions wholly inside the buffer at least
    assert _huge_kib_at(address + 4 * MiB) >= 2048  # the kernel really backs it with huge pages now
    np.testing.assert_array_equal(np.asarray(x), values)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a * 2)(x)), values * 2)
    assert hugepages.collapse({"w": x}) >= 3 * hugepages.REGION  # already huge: still fine


def test_collapse_does_nothing_where_thp_is_off(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "THP_SETTING", setting)
    hugepages.unavailable_reason.cache_clear()
    try:
        assert "off" in hugepages.unavailable_reason()
        assert hugepages.collapse({"w": jnp.ones((MiB,), jnp.float32)}) == 0
    finally:
        hugepages.unavailable_reason.cache_clear()


@pytest.mark.skipif(hugepages.unavailable_reason() is not None or not native.available(),
                    reason=str(hugepages.unavailable_reason() or native.unavailable_reason()))
def test_native_backend_collapses_the_decoded_arrays_and_decodes_the_same_tokens():
    from flax import nnx

    from lsjax.config import ModelConfig
    from lsjax.generate import Generator
    from lsjax.model import Llama

    config = ModelConfig.from_dict(dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=2,
                                        num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=128))
    model = Llama(config, rngs=nnx.Rngs(0))  # 1 MiB MLP weights: worth collapsing
    prompts = [[5, 17, 300, 2], [9, 9]]
    plain = Generator(model, None, backend=native_backend(huge_pages=False))
    a = plain.generate(prompts, max_new_tokens=8, stop_token_ids=()).token_ids
    huge = Generator(model, None, backend="native")
    assert plain.prepared["huge_page_bytes"] == 0
    assert huge.prepared["huge_page_bytes"] >= 4 * hugepages.REGION  # 2 layers x 2 MLP products of 2 MiB at least
    assert huge.generate(prompts, max_new_tokens=8, stop_token_ids=()).token_ids == a
