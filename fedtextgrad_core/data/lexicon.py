"""Words the object-counting task is made of: item nouns by category and number words.

Shared by the synthetic generator (to write questions) and the simulated LLM (to read
them), so that both agree on what counts as a fruit or a musical instrument. The
nouns are the everyday items BIG-Bench Hard's object counting uses.
"""

from __future__ import annotations

# category as it appears in "How many <category> do I have?" -> (singular, plural) nouns
CATEGORIES: dict[str, list[tuple[str, str]]] = {
    "musical instruments": [
        ("accordion", "accordions"), ("clarinet", "clarinets"), ("drum", "drums"),
        ("flute", "flutes"), ("piano", "pianos"), ("trombone", "trombones"),
        ("trumpet", "trumpets"), ("violin", "violins"),
    ],
    "fruits": [
        ("apple", "apples"), ("banana", "bananas"), ("blackberry", "blackberries"),
        ("grape", "grapes"), ("nectarine", "nectarines"), ("orange", "oranges"),
        ("peach", "peaches"), ("plum", "plums"), ("raspberry", "raspberries"),
        ("strawberry", "strawberries"),
    ],
    "vegetables": [
        ("cabbage", "cabbages"), ("carrot", "carrots"), ("cauliflower", "cauliflowers"),
        ("garlic", "garlics"), ("head of broccoli", "heads of broccoli"),
        ("lettuce head", "lettuce heads"), ("onion", "onions"), ("potato", "potatoes"),
        ("stalk of celery", "stalks of celery"), ("yam", "yams"),
    ],
    "animals": [
        ("bear", "bears"), ("cat", "cats"), ("chicken", "chickens"), ("cow", "cows"),
        ("dog", "dogs"), ("donkey", "donkeys"), ("duck", "ducks"), ("fish", "fish"),
        ("frog", "frogs"), ("goat", "goats"), ("mouse", "mice"), ("pig", "pigs"),
        ("rabbit", "rabbits"), ("snail", "snails"), ("snake", "snakes"),
    ],
    "objects": [
        ("bed", "beds"), ("car", "cars"), ("chair", "chairs"), ("couch", "couches"),
        ("fridge", "fridges"), ("lamp", "lamps"), ("microwave", "microwaves"),
        ("oven", "ovens"), ("stove", "stoves"), ("table", "tables"), ("toaster", "toasters"),
    ],
}

NUMBER_WORDS: dict[str, int] = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}
NUMBER_NAMES: dict[int, str] = {
    2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
    7: "seven", 8: "eight", 9: "nine", 10: "ten",
}

# noun (singular or plural) -> category
NOUN_CATEGORY: dict[str, str] = {
    noun: category
    for category, pairs in CATEGORIES.items()
    for pair in pairs
    for noun in pair
}


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"
