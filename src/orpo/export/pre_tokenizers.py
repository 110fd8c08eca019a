"""Which llama.cpp pre-tokenizer a byte-level BPE tokenizer needs (``tokenizer.ggml.pre``).

llama.cpp splits text before BPE with a hand-written rule per tokenizer family, chosen by name; the
name is not in the Hugging Face files, so it is recognised from how the tokenizer encodes a fixed text:
the sha256 of ``str(ids)`` for :data:`FINGERPRINT_TEXT` (llama.cpp's ``convert_hf_to_gguf.py`` does the
same, and its ``convert_hf_to_gguf_update.py`` lists the tokenizers it knows). Only the families
that come with the architectures orpo exports are listed; any other name llama.cpp knows can be given
by hand (``orpo export --tokenizer-pre NAME``)."""

# The text llama.cpp fingerprints with (whitespace runs, emoji, digits, scripts, apostrophes): a tokenizer
# that splits any of it differently from the family it claims gets another hash.
FINGERPRINT_TEXT = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"

# sha256 of str(ids) -> llama.cpp pre-tokenizer name (the reference tokenizer in the comment).
KNOWN_FINGERPRINTS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B-Instruct
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-ai/deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-ai/deepseek-coder-6.7b-base
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",  # sapienzanlp/Minerva-7B-base-v1.0
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}

# Every pre-tokenizer name llama.cpp accepts (llama-vocab.cpp); a file naming another one does not load.
LLAMA_CPP_NAMES = frozenset(
    """
    default llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano
    deepseek-llm deepseek-coder deepseek-v3 youtu falcon mpt starcoder gpt-2 phi-2 jina-es jina-de
    gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 jina-v1-en jina-v2-code
    roberta-bpe refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx
    smaug-bpe poro-chat glm4 chatglm-bpe viking jais tekken smollm codeshell bloom gpt3-finnish
    exaone exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 tiny_aya superbpe
    trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense
    joyai-llm kimi-k2 grok-2 afmoe minimax-m2 solar-open
    """.split()
)
