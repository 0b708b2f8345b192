"""Build capcli/assets/imagenet-words.json: ImageNet-1k classes -> the word a caption would use.

A dev script (capcli never imports it; captioning needs no WordNet). Rebuild with::

    pip install timm nltk && apt-get install wordnet-base
    python scripts/build_imagenet_words.py

Inputs:
- the 1000 class synset ids in class-index order, from timm's package data (``timm.data.ImageNetInfo``);
- WordNet 3.0 from Debian's ``wordnet-base`` (/usr/share/wordnet), read through NLTK's WordNetCorpusReader;
- the shipped model's vocabulary (capcli/assets/flickr8k-attention.pt) and word counts over the Flickr8k TRAIN
  split only (../shared/data/flickr8k, never coco-mini).

The rule, per class: walk the synset's hypernyms from specific to general (breadth first by distance) and take
the first lemma that is a caption word: a single token that is in the shipped vocabulary (seen >= MIN_COUNT
times in the train split) or in BASIC_NOUNS (basic-level nouns, all 80 COCO object names among them), and is
not TOO_GENERAL or SUBORDINATE. A synset in ANCHORS ends the walk with its word (every dog breed -> dog).
OVERRIDES (each with a reason) fix what the rule gets wrong; NULLS are classes with no sensible caption word.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_WORDNET = Path("/usr/share/wordnet")
MIN_COUNT = 5  # the shipped vocabulary's own threshold


def _words(text: str) -> set[str]:
    return set(text.split())


# All 80 COCO object names (multi-word ones by the token a caption uses for them) and other basic-level nouns
# a one-line photo description uses, whether or not the shipped model learned them.
COCO_NOUNS = _words("""
person bicycle car motorcycle airplane bus train truck boat light hydrant sign meter bench bird cat
dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard ball
kite bat glove skateboard surfboard racket bottle glass cup fork knife spoon bowl banana apple sandwich orange
broccoli carrot hotdog pizza donut cake chair couch plant bed table toilet tv laptop mouse remote keyboard phone
microwave oven toaster sink refrigerator book clock vase scissors teddy dryer toothbrush""")
BASIC_NOUNS = COCO_NOUNS | _words("""
animal fish shark ray whale dolphin seal otter beaver turtle tortoise lizard snake frog toad crocodile alligator
spider scorpion crab lobster shrimp snail slug jellyfish starfish coral worm butterfly moth bee ant beetle fly
dragonfly grasshopper cricket cockroach mantis ladybug insect hen rooster chicken duck goose swan owl eagle hawk
vulture parrot peacock flamingo pelican penguin ostrich hummingbird stork heron crane pigeon lion tiger leopard
cheetah jaguar wolf fox coyote hyena monkey gorilla chimpanzee orangutan ape baboon lemur panda koala kangaroo
rabbit hare squirrel rat hamster hedgehog porcupine pig hog boar ox bull bison buffalo camel llama goat ram deer
antelope gazelle hippopotamus rhinoceros armadillo sloth skunk badger weasel mink raccoon bat
mug cup plate pot pan kettle teapot jug pitcher bucket basket bag box barrel jar can bottle
shirt jacket coat dress skirt jeans suit hat cap helmet mask shoe shoes boot sandal sock scarf uniform jersey
bikini swimsuit apron kimono gown sweater vest glasses sunglasses goggles necklace watch wallet purse
computer monitor screen television radio camera tripod printer speaker microphone piano guitar violin cello drum
flute trumpet trombone saxophone harmonica accordion banjo harp organ
car truck van jeep taxi ambulance limousine tractor trailer bus bicycle motorcycle scooter tricycle wagon cart
train tram locomotive airplane plane jet helicopter airship balloon rocket ship boat canoe kayak yacht sailboat
submarine tank cannon gun rifle sword shield
house church castle palace tower bridge fountain barn tent lighthouse windmill fence gate wall door window
stairs dam pier dock library restaurant shop store market stadium greenhouse mosque temple cinema
mountain volcano cliff valley beach lake sea ocean river waterfall cave island reef geyser
tree flower mushroom fruit vegetable corn pineapple strawberry lemon fig pomegranate cucumber pumpkin cabbage
cauliflower pepper potato mushroom bread bagel pretzel burrito soup coffee tea wine beer
chair sofa couch bench bed crib cradle desk table shelf bookcase cabinet wardrobe drawer lamp candle stove oven
fridge refrigerator dishwasher washer heater fan vacuum iron toilet bathtub tub shower sink mirror curtain
umbrella clock hourglass bell key lock padlock chain rope net hammer axe saw shovel rake broom mop drill
screwdriver wrench nail screw ladder wheel tire pillow blanket quilt towel rug mat envelope letter book
puzzle doll toy ball balloon kite skateboard surfboard ski skis snowboard sled swing slide trampoline
""")

# A class under one of these synsets takes its word, whatever more specific lemma is on the way: every breed
# (beagle, dalmatian, husky, boxer...) is "a dog" in a one-line caption, every domestic cat breed "a cat".
ABSORB = {
    "dog.n.01": "dog",
    "domestic_cat.n.01": "cat",
    "elephant.n.01": "elephant",
    "fungus.n.01": "mushroom",  # agaric, bolete, stinkhorn, earthstar...
}
# Walk stops: a synset here ends the walk with its word when no caption word came first (goose, owl and
# flamingo stay themselves; brambling, junco and jay become "bird").
ANCHORS = {
    "monkey.n.01": "monkey",
    "bird.n.01": "bird",
    "wolf.n.01": "wolf",
    "fox.n.01": "fox",
    "bear.n.01": "bear",
    "snake.n.01": "snake",
    "lizard.n.01": "lizard",
    "frog.n.01": "frog",
    "spider.n.01": "spider",
    "butterfly.n.01": "butterfly",
    "beetle.n.01": "beetle",
    "shark.n.01": "shark",
    "turtle.n.01": "turtle",
}

# Words the walk passes over: too general to caption a photo with, or subordinate (breed-level) words.
# Also vocabulary words whose caption sense is not the WordNet sense the walk meets (game = hunted animal,
# construction = structure, gear = equipment, course = part of a meal, jack = jackfruit, ...).
TOO_GENERAL = _words("""entity object thing whole item unit part piece artifact device equipment instrument
instrumentality structure system container covering commodity matter substance material organism being creature
implement tool article product stuff way area place region line form shape type kind group set body food
vertebrate invertebrate mammal placental carnivore herbivore reptile amphibian arthropod mollusk
construction work patch good arm gear outfit ride board control top post head bar course mini jack rubber spot
litter site key coach bank hose plant pool surface wind wood game barrier shade home watercraft
""")
SUBORDINATE = _words("""terrier retriever spaniel poodle collie shepherd hound setter pointer sheepdog bulldog
""")
# When the walk only finds one of these, the class's own one-word name is the better caption word
# (abacus, not "machine"; meerkat, not "animal"; crutch, not "stick").
FALL_BACK_TO_NAME = {"machine", "vehicle", "fabric", "clothing", "stick", "furniture", "animal"}


@dataclass(frozen=True)
class Override:
    word: str | None
    reason: str


# (class index, its name, the word to use, why): where the rule above gets it wrong. Reviewed one by one against
# the rule's output; the build checks each name against the class list so an index slip fails loudly.
_OVERRIDES: list[tuple[int, str, str | None, str]] = [
    (7, "cock", "chicken", "a rooster is captioned as a chicken (rooster is unseen in the captions)"),
    (8, "hen", "chicken", "the caption word for a hen; 'chicken' is in the vocabulary, 'hen' is not"),
    (21, "kite", "bird", "the bird of prey: the rule's 'kite' is the toy in every caption"),
    (25, "European fire salamander", "salamander", "a salamander, not just 'animal'"),
    (26, "common newt", "salamander", "a newt looks like, and is, a salamander"),
    (27, "eft", "salamander", "'eft' (a young newt) is too rare a word"),
    (28, "spotted salamander", "salamander", "a salamander, not just 'animal'"),
    (48, "Komodo dragon", "lizard", "the rule's 'monitor' is the computer screen in captions"),
    (61, "boa constrictor", "snake", "'boa' in captions is the feather boa"),
    (62, "rock python", "snake", "the rule's 'boa' is the feather boa in captions"),
    (70, "harvestman", "spider", "a daddy longlegs: people call it a spider"),
    (78, "tick", "insect", "'tick' is too rare and ambiguous; people call it a bug"),
    (80, "black grouse", "bird", "game bird: the rule's 'game' is a sport in captions"),
    (81, "ptarmigan", "bird", "a game bird species"),
    (82, "ruffed grouse", "bird", "game bird: the rule's 'game' is a sport in captions"),
    (83, "prairie chicken", "bird", "a grouse, not a chicken"),
    (85, "quail", "bird", "a game bird species"),
    (86, "partridge", "bird", "a game bird species"),
    (101, "tusker", "elephant", "ImageNet's tusker photos are elephants"),
    (112, "conch", "shell", "a conch on a beach is captioned as a shell"),
    (117, "chambered nautilus", "shell", "a nautilus shell"),
    (125, "hermit crab", "crab", "WordNet files it beside crabs, not under them"),
    (134, "crane", "bird", "the bird: 'crane' is also class 517, the machine"),
    (137, "American coot", "bird", "the rule's 'rail' is a railing in captions"),
    (148, "killer whale", "whale", "an orca is called a whale, not a dolphin"),
    (150, "sea lion", "seal", "kept explicit: 'sea lion' has no one-word name but seal"),
    (273, "dingo", "dog", "a wild dog that looks like a dog"),
    (274, "dhole", "dog", "a wild dog that looks like a dog"),
    (275, "African hunting dog", "dog", "a wild dog that looks like a dog"),
    (286, "cougar", "cougar", "the rule's 'cat' would count a cougar as a house cat"),
    (287, "lynx", "lynx", "the rule's 'cat' would count a lynx as a house cat"),
    (289, "snow leopard", "leopard", "a leopard, not a house cat"),
    (341, "hog", "pig", "'pig' is the caption word; 'hog' is rarer"),
    (342, "wild boar", "pig", "a wild pig; 'boar' is rare in captions"),
    (343, "warthog", "pig", "a wild pig"),
    (348, "ram", "sheep", "a male sheep; 'ram' in captions is mostly the verb"),
    (349, "bighorn", "sheep", "a wild sheep"),
    (358, "polecat", "ferret", "a polecat looks like a ferret"),
    (359, "black-footed ferret", "ferret", "a ferret, not just 'animal'"),
    (403, "aircraft carrier", "ship", "the rule's 'carrier' is not what a caption calls it"),
    (408, "amphibian", "vehicle", "an amphibious vehicle: the rule's own name 'amphibian' means the animal"),
    (410, "apiary", "beehive", "ImageNet's apiary photos are beehives"),
    (419, "Band Aid", "bandage", "the generic name"),
    (436, "beach wagon", "car", "a station wagon is a car"),
    (442, "bell cote", "bell", "a bell tower: the bell is what shows"),
    (455, "bottlecap", "bottlecap", "the rule's 'cap' is a hat in captions"),
    (458, "brass", "plaque", "a memorial brass is a plaque"),
    (459, "brassiere", "bra", "the everyday word"),
    (461, "breastplate", "armor", "the rule's 'plate' is a dinner plate"),
    (473, "can opener", None, "no one-word name: 'opener' alone is not what a caption says"),
    (477, "carpenter's kit", "toolbox", "a box of tools"),
    (482, "cassette player", "stereo", "no one-word name; a stereo"),
    (485, "CD player", "stereo", "no one-word name; a stereo"),
    (487, "cellular telephone", "phone", "both are in the vocabulary; 'phone' also covers the pay-phone"),
    (490, "chain mail", "armor", "armour"),
    (492, "chest", "box", "'chest' in captions is the body part"),
    (493, "chiffonier", "dresser", "a chest of drawers; 'chest' in captions is the body part"),
    (496, "Christmas stocking", "stocking", "the stocking itself"),
    (500, "cliff dwelling", "cliff", "ruins in a cliff face"),
    (502, "clog", "shoe", "'clog' is rare and ambiguous"),
    (503, "cocktail shaker", "shaker", "no one-word name but shaker"),
    (521, "Crock Pot", "pot", "a slow cooker is a pot"),
    (524, "cuirass", "armor", "armour"),
    (533, "dishrag", "towel", "a dish towel"),
    (535, "disk brake", "wheel", "a brake disc shows as a wheel"),
    (538, "dome", "dome", "the rule's 'roof' loses the shape"),
    (540, "drilling platform", "rig", "an offshore oil rig; 'platform' in captions is a stage or station"),
    (544, "Dutch oven", "pot", "a cooking pot, not an oven"),
    (548, "entertainment center", "cabinet", "a TV cabinet"),
    (550, "espresso maker", "machine", "an espresso machine"),
    (553, "file", "cabinet", "a filing cabinet; 'file' is the tool"),
    (557, "flagpole", "flag", "the photos show the flag"),
    (565, "freight car", "train", "a railway car: the rule's 'car' would count it as an automobile"),
    (566, "French horn", "horn", "no one-word name but horn"),
    (571, "gas pump", "pump", "no one-word name but pump"),
    (573, "go-kart", "go-kart", "its own name (one token to the tokenizer); the rule's 'vehicle' is vague"),
    (575, "golfcart", "cart", "a golf cart"),
    (582, "grocery store", "store", "a store"),
    (584, "hair slide", "clip", "a hair clip"),
    (585, "hair spray", "bottle", "a spray bottle"),
    (586, "half track", "truck", "a military truck"),
    (598, "home theater", "television", "a living room with a big screen"),
    (602, "horizontal bar", None, "gymnastics apparatus: 'bar' in captions is a drinks bar"),
    (607, "jack-o'-lantern", "pumpkin", "a carved pumpkin"),
    (608, "jean", "jeans", "the caption word is the plural form"),
    (612, "jinrikisha", "rickshaw", "the current word"),
    (615, "knee pad", "pad", "no one-word name but pad"),
    (619, "lampshade", "lamp", "a lamp"),
    (621, "lawn mower", "mower", "no one-word name but mower"),
    (622, "lens cap", "lens", "the rule's 'cap' is a hat in captions"),
    (626, "lighter", "lighter", "the rule's 'light' loses the object"),
    (634, "lumbermill", "sawmill", "the rule's 'works' is not a noun a caption uses"),
    (635, "magnetic compass", "compass", "the compass"),
    (637, "mailbox", "mailbox", "the rule's 'box' loses the object"),
    (638, "maillot", "leotard", "this maillot is the dancer's tights/leotard (639 is the swimsuit)"),
    (640, "manhole cover", "manhole", "no one-word name but manhole"),
    (644, "matchstick", "match", "a match"),
    (645, "maypole", "pole", "the rule's 'vertical' is an adjective in captions"),
    (647, "measuring cup", "cup", "a cup"),
    (656, "minivan", "van", "a van, not a car"),
    (657, "missile", "rocket", "kept explicit: ImageNet's missile photos show rockets"),
    (660, "mobile home", "trailer", "a trailer"),
    (663, "monastery", "building", "the rule's 'house' is a home"),
    (669, "mosquito net", "net", "a net"),
    (675, "moving van", "van", "kept explicit: a van"),
    (678, "neck brace", "brace", "no one-word name but brace"),
    (680, "nipple", "bottle", "a baby bottle's teat; the bottle is what shows"),
    (681, "notebook", "laptop", "the notebook computer: a laptop"),
    (682, "obelisk", "monument", "the rule's 'column' misses the obelisk"),
    (686, "oil filter", "filter", "no one-word name but filter"),
    (691, "oxygen mask", "mask", "a mask"),
    (697, "pajama", "pajamas", "the caption word is the plural form"),
    (699, "panpipe", "flute", "a pan flute; the rule's 'pipe' is a smoking pipe"),
    (702, "parallel bars", None, "gymnastics apparatus: 'bars' in captions are drinks bars"),
    (704, "parking meter", "meter", "COCO's 'parking meter' by its one-word name"),
    (705, "passenger car", "train", "a railway carriage: part of a train"),
    (707, "pay-phone", "phone", "the caption word"),
    (710, "pencil sharpener", "sharpener", "no one-word name but sharpener"),
    (714, "pick", None, "a guitar pick: 'pick' in captions is the verb"),
    (719, "piggy bank", None, "no one-word name: 'bank' in captions is a river bank or a building"),
    (723, "pinwheel", "pinwheel", "the rule's 'wheel' loses the toy"),
    (724, "pirate", "ship", "ImageNet's pirate class is the pirate ship"),
    (725, "pitcher", "jug", "'pitcher' in captions is the baseball player"),
    (726, "plane", None, "the carpenter's plane: 'plane' in captions is an airplane"),
    (727, "planetarium", "dome", "the photos show its dome"),
    (734, "police van", "van", "the rule's 'wagon' is a cart in captions"),
    (744, "projectile", "rocket", "ImageNet's projectile, missile photos show rockets"),
    (747, "punching bag", "bag", "the rule's 'ball' is wrong"),
    (751, "racer", "car", "a race car"),
    (756, "rain barrel", "barrel", "a barrel"),
    (757, "recreational vehicle", "camper", "an RV"),
    (767, "rubber eraser", "eraser", "the rule's 'rubber' is the material in captions"),
    (769, "rule", "ruler", "the measuring stick"),
    (771, "safe", "safe", "the rule's 'box' loses the object"),
    (772, "safety pin", "pin", "a pin"),
    (773, "saltshaker", "shaker", "a salt shaker"),
    (780, "schooner", "ship", "a sailing ship"),
    (781, "scoreboard", "scoreboard", "the rule's 'sign' loses the object"),
    (785, "seat belt", "belt", "no one-word name but belt"),
    (798, "slide rule", "ruler", "the rule's 'computer' is wrong for a photo"),
    (800, "slot", "machine", "a slot machine: 'slot' alone is not its name"),
    (804, "soap dispenser", "soap", "a soap dispenser"),
    (807, "solar dish", "dish", "a dish antenna-like solar collector"),
    (810, "space bar", "keyboard", "the photos show a keyboard"),
    (812, "space shuttle", "rocket", "a launch vehicle; 'shuttle' is rare in captions"),
    (815, "spider web", "web", "a web"),
    (818, "spotlight", "light", "a light"),
    (820, "steam locomotive", "train", "a locomotive is captioned as a train"),
    (547, "electric locomotive", "train", "a locomotive is captioned as a train"),
    (822, "steel drum", "drum", "a drum"),
    (825, "stone wall", "wall", "the rule's 'fence' is wrong"),
    (836, "sunglass", "sunglasses", "the lens class: the photos show sunglasses"),
    (838, "sunscreen", "lotion", "a bottle of lotion"),
    (848, "tape player", "stereo", "no one-word name; a stereo"),
    (855, "thimble", "thimble", "the rule's 'cap' is wrong"),
    (861, "toilet seat", "toilet", "the photos show a toilet"),
    (862, "torch", "torch", "the rule's 'light' loses the object"),
    (863, "totem pole", "pole", "a pole"),
    (869, "trench coat", "coat", "a coat; 'raincoat' is rarer"),
    (873, "triumphal arch", "arch", "an arch"),
    (878, "typewriter keyboard", "typewriter", "the photos show a typewriter"),
    (884, "vault", "ceiling", "an arched ceiling"),
    (887, "vestment", "robe", "a robe"),
    (891, "waffle iron", "waffle", "no one-word name; the waffle shows"),
    (895, "warplane", "airplane", "an airplane"),
    (896, "washbasin", "sink", "a sink"),
    (900, "water tower", "tower", "a tower, not a tank"),
    (904, "window screen", "window", "a window"),
    (905, "window shade", "window", "a window blind"),
    (915, "yurt", "tent", "a round tent"),
    (916, "web site", None, "a screenshot: no object to caption"),
    (917, "comic book", "book", "a book"),
    (921, "book jacket", "book", "the rule's 'jacket' is clothing in captions"),
    (926, "hot pot", "soup", "a soup"),
    (927, "trifle", "dessert", "a dessert"),
    (928, "ice cream", "dessert", "no one-word name; 'ice' alone is frozen water"),
    (929, "ice lolly", "popsicle", "the one-word name"),
    (933, "cheeseburger", "burger", "a burger, not a sandwich"),
    (939, "zucchini", "zucchini", "the rule's 'vegetable' is vaguer than the everyday name"),
    (940, "spaghetti squash", "squash", "a squash"),
    (941, "acorn squash", "squash", "a squash"),
    (942, "butternut squash", "squash", "a squash"),
    (944, "artichoke", "artichoke", "the rule's 'vegetable' is vaguer than the everyday name"),
    (955, "jackfruit", "fruit", "a fruit"),
    (959, "carbonara", "pasta", "a pasta dish"),
    (960, "chocolate sauce", "chocolate", "chocolate"),
    (962, "meat loaf", "meat", "a meat dish"),
    (964, "potpie", "pie", "a pie"),
    (969, "eggnog", "drink", "a drink"),
    (975, "lakeside", "lake", "a lake"),
    (976, "promontory", "cliff", "a headland: the rule's 'formation' is vague"),
    (977, "sandbar", "beach", "sand and water"),
    (978, "seashore", "beach", "the caption word"),
    (981, "ballplayer", "player", "a baseball player"),
    (984, "rapeseed", "flower", "a field of yellow flowers"),
    (988, "acorn", "acorn", "the rule's 'fruit' is wrong for a nut"),
    (989, "hip", "fruit", "a rose hip"),
    (990, "buckeye", "nut", "a nut, not a fruit"),
    (998, "ear", "corn", "an ear of corn"),
    (999, "toilet tissue", "paper", "toilet paper"),
]


# lexnames(5WN): the lexicographer files, in file-number order.
_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl")


def open_wordnet():
    """NLTK's WordNetCorpusReader on Debian's WordNet 3.0 database.

    Debian ships no ``lexnames`` file (NLTK needs one) and NLTK refuses paths outside its data path, so the
    database is copied into a private temporary folder with a lexnames file written from lexnames(5WN).
    """
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    lexnames = _LEXNAMES.split()
    tmp = tempfile.mkdtemp(prefix="wordnet30-")
    for f in DEBIAN_WORDNET.iterdir():
        if f.is_file() and re.fullmatch(r"(data|index)\.(noun|verb|adj|adv)|\w+\.exc|cntlist\.rev", f.name):
            shutil.copy(f, tmp)
    with open(os.path.join(tmp, "lexnames"), "w") as fh:
        fh.writelines(f"{i:02d}\t{n}\t{1 if n.startswith('noun') else 2}\n" for i, n in enumerate(lexnames))
    nltk.data.path.append(tmp)

    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # no other WordNet to map to: this one is 3.0
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wn = Reader(tmp, None)
    if wn.get_version() != "3.0":
        raise SystemExit(f"expected WordNet 3.0 in {DEBIAN_WORDNET}, found {wn.get_version()}")
    return wn


def imagenet_classes() -> list[tuple[str, str]]:
    """(wnid, readable first lemma) of the 1000 ImageNet-1k classes in class-index order (timm's data)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [(info.index_to_label_name(i), info.index_to_description(i).split(",")[0].strip())
            for i in range(info.num_classes())]


def train_counts(flickr8k: Path) -> Counter:
    """Token counts over the captions of the Flickr8k train split only."""
    from capcli.vocab import tokenize

    caps = json.loads((flickr8k / "captions.json").read_text())
    train = set(json.loads((flickr8k / "splits.json").read_text())["train"])
    ids = {im["id"] for im in caps["images"] if im["file_name"] in train}
    return Counter(t for a in caps["annotations"] if a["image_id"] in ids for t in tokenize(a["caption"]))


def shipped_vocab(path: Path) -> list[str]:
    from capcli.checkpoint import load_checkpoint
    from capcli.vocab import Vocabulary

    return Vocabulary.from_dict(load_checkpoint(path)["vocab"]).words


def ancestors(synset) -> dict:
    """Every hypernym (and instance hypernym) of ``synset`` with its shortest distance, the synset itself at 0."""
    dist = {synset: 0}
    frontier = [synset]
    while frontier:
        nxt = []
        for s in frontier:
            for h in s.hypernyms() + s.instance_hypernyms():
                if h not in dist:
                    dist[h] = dist[s] + 1
                    nxt.append(h)
        frontier = nxt
    return dist


class Namer:
    """The walk: the first caption word on a synset's hypernyms, specific to general."""

    def __init__(self, vocab: set[str], counts: Counter) -> None:
        self.vocab = vocab
        self.counts = counts

    def is_caption_word(self, word: str) -> bool:
        if not word.isalpha() or word in TOO_GENERAL or word in SUBORDINATE:
            return False
        return word in BASIC_NOUNS or (word in self.vocab and self.counts[word] >= MIN_COUNT)

    def name(self, synset):
        """(word, the synset it was found on), or (None, None): the walk, or the class's own one-word name."""
        word, found = self.walk(synset)
        own = synset.lemma_names()[0].lower()
        if (word is None or word in FALL_BACK_TO_NAME) and own.isalpha():
            return own, synset
        return word, found

    def walk(self, synset):
        """(word, the synset it was found on), or (None, None)."""
        up = sorted(ancestors(synset).items(), key=lambda kv: kv[1])
        for s, _ in up:
            if s.name() in ABSORB:
                return ABSORB[s.name()], s
        for s, _ in up:
            if s.name() in ANCHORS:
                return ANCHORS[s.name()], s
            for lemma in s.lemma_names():
                if self.is_caption_word(lemma.lower()):
                    return lemma.lower(), s
        return None, None


def overrides(classes: list[tuple[str, str]]) -> dict[str, Override]:
    """_OVERRIDES keyed by wnid, each checked against the class it names."""
    out = {}
    for index, name, word, reason in _OVERRIDES:
        wnid, actual = classes[index]
        if actual != name:
            raise SystemExit(f"override for class {index} names {name!r} but that class is {actual!r}")
        if wnid in out:
            raise SystemExit(f"two overrides for class {index} ({name})")
        out[wnid] = Override(word, reason)
    return out


def distance(a: dict, b: dict) -> int | None:
    """Shortest hypernym-path distance between two synsets given their ``ancestors`` maps (None: unrelated)."""
    common = a.keys() & b.keys()
    return min(a[x] + b[x] for x in common) if common else None


# The sense an override word means where nearest_sense's guess is wrong (reviewed).
WORD_SENSES = {"beehive": "beehive.n.04", "horn": "french_horn.n.01", "net": "net.n.06", "pin": "pin.n.09",
               "pad": "pad.n.04", "sunglasses": "sunglasses.n.01", "television": "television_receiver.n.01",
               "toilet": "toilet.n.02", "van": "van.n.05", "corn": "corn.n.03", "pumpkin": "pumpkin.n.02",
               "chocolate": "chocolate.n.02"}


def nearest_sense(wn, word: str, synset):
    """The noun sense of an override's ``word`` meant for the class ``synset`` (sink -> sink.n.01, not cesspool).

    Among the senses in the class's lexicographer file (an artifact names an artifact), the one with the least
    hypernym distance to the class plus 2 per step down WordNet's frequency order.
    """
    if word in WORD_SENSES:
        return wn.synset(WORD_SENSES[word])
    senses = wn.synsets(word, "n")
    if not senses:
        raise SystemExit(f"{word!r} is not a WordNet noun")
    same = [(i, s) for i, s in enumerate(senses) if s.lexname() == synset.lexname()] or list(enumerate(senses))
    up = ancestors(synset)
    scored = [((d if (d := distance(up, ancestors(s))) is not None else 99) + 2 * i, i, s) for i, s in same]
    return min(scored)[2]


def name_classes(wn, classes, namer: Namer) -> tuple[list[dict], dict[str, object]]:
    """The "classes" entries, and for each word the sense its relatives are measured from."""
    fixes = overrides(classes)
    entries, word_sense = [], {}
    for index, (wnid, name) in enumerate(classes):
        synset = wn.synset_from_pos_and_offset(wnid[0], int(wnid[1:]))
        word, found = namer.name(synset)
        if wnid in fixes:
            word = fixes[wnid].word
            found = nearest_sense(wn, word, synset) if word else None
        entry = {"index": index, "wnid": wnid, "name": name, "word": word}
        if word is None:
            entry["reason"] = fixes[wnid].reason if wnid in fixes else "no caption word on its hypernyms"
        entries.append(entry)
        if word is not None and word not in word_sense:
            word_sense[word] = found
    return entries, word_sense


# Words that are already plural (the caption word is the plural form).
PLURAL_ONLY = {"jeans", "pajamas", "sunglasses", "binoculars", "scissors", "skis", "glasses"}
# Concrete noun classes (WordNet lexicographer files) a relative may come from.
CONCRETE = {"noun.animal", "noun.artifact", "noun.food", "noun.plant", "noun.object", "noun.person",
            "noun.substance"}


# Plurals the rules below get wrong: invariant nouns, and WordNet's rarer variant first.
PLURAL_FIXES = {"sheep": [], "fish": ["fishes"], "deer": [], "bison": [], "taxi": ["taxis"], "bus": ["buses"],
                "buffalo": ["buffaloes", "buffalos"]}


def plurals(wn, word: str) -> list[str]:
    """Plural forms, the usual one first: WordNet's irregular ones (noun.exc), else the regular English rule.

    A Latin plural (camerae, vacua, abaci) comes after the English one.
    """
    if word in PLURAL_FIXES:
        return PLURAL_FIXES[word]
    if word in PLURAL_ONLY:
        return []
    if re.search(r"(s|x|z|ch|sh)$", word):
        regular = word + "es"
    elif re.search(r"[^aeiou]y$", word):
        regular = word[:-1] + "ies"
    else:
        regular = word + "s"
    irregular = sorted(k for k, v in wn._exception_map["n"].items() if word in v and k != word)
    if not irregular:
        return [regular]
    latin = [f for f in irregular if f.endswith(("ae", "i", "a")) or (word.endswith("is") and f.endswith("es"))]
    return [regular, *latin] if latin else irregular


# Vocabulary words whose caption sense is not WordNet's first noun sense (bat: the animal; crane: a writer).
CAPTION_SENSE = {"bat": "bat.n.05", "crane": "crane.n.04", "tiger": "tiger.n.02", "seal": "seal.n.09",
                 "chicken": "chicken.n.02", "monitor": "monitor.n.04", "dalmatian": "dalmatian.n.02",
                 "bunny": "bunny.n.02", "puck": "puck.n.02", "climber": "climber.n.04", "sidecar": "sidecar.n.02",
                 "glass": "glass.n.02", "dolphin": "dolphin.n.02"}


def mostly_noun(wn, word: str) -> bool:
    """Whether ``word`` is used as a noun more than otherwise (SemCor counts); "white", "young", "down" are not."""
    def tagged(pos: str) -> int:
        return sum(lm.count() for s in wn.synsets(word, pos) for lm in s.lemmas() if lm.name().lower() == word)

    others = [p for p in "vasr" if wn.synsets(word, p)]
    return not others or tagged("n") > sum(tagged(p) for p in others)


# Never relatives: adjectives in captions ("a male dog"), and plural tokens of another vocabulary word
# ("arms" is WordNet's weapons).
NOT_RELATIVES = _words("""male female facing stand hanging young down same he i as be have cutout works arms
cows steps bars waters shades falls fields seats boards digs rings rails eats tails beads colors cords weeds""")
MAX_RELATIVE_DISTANCE = 8  # hypernym steps; farther than this a "relative" only shares "physical entity"


class Relatives:
    """Nearest vocabulary nouns of a word by WordNet hypernym distance (DCC's embedding transfer)."""

    def __init__(self, wn, vocab: list[str], counts: Counter) -> None:
        self.counts = counts
        self.pool = []  # (word, ancestors of its caption sense)
        for w in vocab:
            if not w.isalpha() or counts[w] < MIN_COUNT or w in TOO_GENERAL | SUBORDINATE | NOT_RELATIVES:
                continue
            senses = wn.synsets(w, "n")
            if not senses or wn.morphy(w, "n") != w or not mostly_noun(wn, w):
                continue
            sense = wn.synset(CAPTION_SENSE[w]) if w in CAPTION_SENSE else senses[0]
            if sense.lexname() in CONCRETE:
                self.pool.append((w, ancestors(sense)))

    def of(self, word: str, sense, in_vocab: bool, k: int = 5) -> list[str]:
        up = ancestors(sense)
        scored = []
        for w, anc in self.pool:
            d = distance(up, anc)
            if d is not None and d <= MAX_RELATIVE_DISTANCE and w != word:
                scored.append((d, -self.counts[w], w))
        best = [w for _, _, w in sorted(scored)]
        return ([word] + best)[:k] if in_vocab else best[:k]


# Worn items that ImageNet mostly shows on their own, not on a person (reviewed out of person_classes): footwear,
# hosiery and small accessories photographed as products.
NOT_WORN_IN_PHOTO = {"Christmas stocking", "Loafer", "running shoe", "clog", "sandal", "cowboy boot", "sock",
                     "knee pad", "hair slide", "wig", "Band Aid", "seat belt", "handkerchief", "mitten"}
# Worn over the face but filed under "covering", not "clothing", in WordNet (reviewed in).
WORN_EXTRA = {"ski mask", "gasmask"}


def person_classes(wn, classes) -> list[int]:
    """Classes whose photos imply a person: people (groom, scuba diver) and clothing, reviewed as above."""
    roots = {wn.synset("person.n.01"), wn.synset("clothing.n.01")}
    out = []
    for index, (wnid, name) in enumerate(classes):
        synset = wn.synset_from_pos_and_offset(wnid[0], int(wnid[1:]))
        derived = bool(roots & ancestors(synset).keys()) and name not in NOT_WORN_IN_PHOTO
        if derived or name in WORN_EXTRA:
            out.append(index)
    return out


def write_table(path: Path, meta: dict, entries: list[dict], words: dict, persons: list[int]) -> None:
    """Compact, diff-friendly JSON: one class per line, one word per line."""
    dump = lambda o: json.dumps(o, ensure_ascii=False)  # noqa: E731
    lines = ["{", f' "meta": {dump(meta)},', ' "classes": [']
    lines += [f"  {dump(e)}{',' if i < len(entries) - 1 else ''}" for i, e in enumerate(entries)]
    lines += [" ],", ' "words": {']
    items = sorted(words.items())
    lines += [f"  {dump(w)}: {dump(v)}{',' if i < len(items) - 1 else ''}" for i, (w, v) in enumerate(items)]
    lines += [" },", f' "person_classes": {dump(persons)}', "}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "capcli" / "assets" / "flickr8k-attention.pt")
    ap.add_argument("--flickr8k", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k")
    ap.add_argument("--out", type=Path, default=ROOT / "capcli" / "assets" / "imagenet-words.json")
    args = ap.parse_args()
    wn = open_wordnet()
    classes = imagenet_classes()
    counts = train_counts(args.flickr8k)
    vocab = shipped_vocab(args.checkpoint)
    entries, word_sense = name_classes(wn, classes, Namer(set(vocab), counts))
    relatives = Relatives(wn, vocab, counts)
    words = {}
    for w, sense in word_sense.items():
        in_vocab = w in vocab
        words[w] = {"plurals": plurals(wn, w), "relatives": relatives.of(w, sense, in_vocab), "in_vocab": in_vocab,
                    "sense": sense.name()}
    meta = {"built_by": "scripts/build_imagenet_words.py",
            "wordnet": f"WordNet {wn.get_version()} (Debian wordnet-base)",
            "classes": "ImageNet-1k class order from timm.data.ImageNetInfo",
            "vocabulary": f"{args.checkpoint.name} ({len(vocab)} words), counts from the Flickr8k train split",
            "overrides": len(_OVERRIDES)}
    write_table(args.out, meta, entries, words, person_classes(wn, classes))
    used = [e["word"] for e in entries if e["word"]]
    print(f"{args.out}: {len(entries)} classes, {len(used)} with a word, {len(words)} words "
          f"({sum(v['in_vocab'] for v in words.values())} in the vocabulary)")


if __name__ == "__main__":
    main()
