"""The data path: corpus -> tokenizer -> token files on disk -> Grain batches."""

from gptjax.data.corpus import DataError, builtin_documents, read_documents
from gptjax.data.pipeline import eval_batches, train_batches
from gptjax.data.prepare import PreparedData, open_tokens, prepare
from gptjax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
