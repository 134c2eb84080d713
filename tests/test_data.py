"""Token arrays are streamed into place as ordinary .npy files, and the Corpus's disk estimate
measures the tokenizer on a sample of the text."""
import io

import numpy as np

from pipeline import data


def test_tokens_stream_into_a_plain_npy_and_the_sample_ratio_matches(tmp_path):
    root, files = data.stdlib_files()
    files = files[:30]
    tokenizer = data.train_tokenizer(files, 512)
    out = tmp_path / "train.npy"
    n = data.tokenize_to_npy(tokenizer, files, out)
    tokens = data.load_tokens(out)
    expected = np.concatenate([np.asarray(enc.ids + [0], dtype=np.uint16) for enc in
                               tokenizer.encode_batch([data.read_text(p) for p in files])])
    np.testing.assert_array_equal(tokens, expected)
    assert n == len(expected) and sorted(p.name for p in tmp_path.iterdir()) == ["train.npy"], "no second copy"
    saved = io.BytesIO()
    np.save(saved, expected)
    assert out.read_bytes() == saved.getvalue(), "byte for byte what np.save writes"

    total = sum(p.stat().st_size for p in files)
    assert data.tokens_per_byte(tokenizer, files, sample_bytes=total) == n / total
    assert 0 < data.tokens_per_byte(tokenizer, files, sample_bytes=1) < 1
    assert data.tokens_per_byte(tokenizer, []) == 1.0
