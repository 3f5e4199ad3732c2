"""The data path: corpus -> tokenizer -> token files on disk -> Grain batches."""

from gptjax.data.corpus import Corpus, DataError, builtin_documents, open_corpus
from gptjax.data.pipeline import eval_batches, train_batches
from gptjax.data.prepare import PreparedData, parse_mixture, prepare
from gptjax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from gptjax.data.tokens import open_tokens
