"""A small real LLaVA dataset that needs no download: photographs shipped inside the scikit-image wheel
(skimage/data/*.png|jpg), hand-written captions and conversations about them, and hand-written language-only
dialogues. ``build_demo_dataset(out_dir)`` writes (byte-identical on every run):

  images/<name>.png|jpg   the original files, bytes unchanged
  llava_stage1.json       plain-template caption samples: {"id", "image", "conversations": [<image>, caption]}
  llava_instruct.json     multi-turn visual conversations (LLaVA JSON); some put the image in a later turn
  sharegpt.json           language-only dialogues (no "image" key); a few use user/assistant/system roles
  tokenizer.model         a sentencepiece BPE model trained on all of the text above

"image" is relative to out_dir (LLaVA's --image_folder); every multimodal sample has exactly one image and one
"<image>" tag. CLI: ``python -m megallava.data.demo_data OUT_DIR``.
"""
import importlib.util
import json
import re
import os
import shutil
import sys
from typing import Dict, List

from megallava.data.templates import IMAGE_PLACEHOLDER, render_prompt
from megallava.data.tokenizer import train_sentencepiece

TOKENIZER_VOCAB = 1536

# Each image: its file in skimage/data, 2-3 captions, and 2-4 conversations as alternating human/gpt values.
IMAGES: List[Dict] = [
    dict(name="astronaut", file="astronaut.png", captions=[
        "A smiling astronaut in an orange spacesuit poses for an official portrait in front of an American flag.",
        "Portrait of a woman astronaut with short brown hair in an orange launch suit, with a model of the space "
        "shuttle behind her.",
        "An astronaut in an orange pressure suit, with her black helmet in the foreground and a US flag on the left.",
    ], conversations=[
        ["<image>\nWhat is the person in the picture wearing?",
         "She is wearing an orange spacesuit of the kind astronauts wear for launch and landing, with a metal ring "
         "around the neck, a round mission patch on the chest and a name tag.",
         "What can you see behind her?",
         "An American flag hangs on the left side of the picture. On the right there is a model of the space shuttle "
         "standing upright, attached to its large external tank and two white rocket boosters."],
        ["<image>\nDescribe the image in detail.",
         "This is a formal portrait of an astronaut. A woman with short brown hair smiles at the camera. She wears an "
         "orange spacesuit with a metal neck ring, and a helmet with a dark visor rests in the lower right corner. "
         "The background is a grey studio backdrop with an American flag on the left and a model of the space shuttle "
         "on the right."],
        ["Why did space shuttle crews wear orange suits?",
         "Shuttle crews wore orange pressure suits, often called pumpkin suits, during launch and landing. The suit "
         "protected them if the cabin lost pressure, and the bright orange colour made a crew member easy to find if "
         "they had to be rescued at sea.",
         "<image>\nIs the person in this photo wearing one?",
         "Yes. The astronaut in this photo is wearing an orange launch and entry suit, and her helmet is placed next "
         "to her in the foreground."],
    ]),
    dict(name="camera", file="camera.png", captions=[
        "A black and white photo of a man in a dark coat looking through a camera mounted on a tripod.",
        "A man films on a wide grassy field with a camera on a tripod, with buildings far in the distance.",
        "Grayscale picture of a man with dark hair and gloves bending toward a camera on a metal tripod.",
    ], conversations=[
        ["<image>\nWhat is the man doing?",
         "He is looking through the viewfinder of a camera that stands on a tripod, as if he is about to take a "
         "picture or record a video.",
         "Where is he?",
         "He is outdoors on a wide, flat grassy field. Buildings can be seen far away in the background, among them "
         "a domed building and a tall tower."],
        ["<image>\nIs this a colour photograph?",
         "No, it is a black and white photograph.",
         "What is he wearing?",
         "He is wearing a long dark coat over a white shirt, and dark gloves on both hands."],
        ["What is a tripod used for?",
         "A tripod is a three-legged stand that holds a camera steady. It helps to avoid blurry pictures and lets the "
         "photographer keep exactly the same framing.",
         "<image>\nWhat is the camera in this picture standing on?",
         "It stands on a metal tripod whose three legs spread out on the grass below the camera."],
    ]),
    dict(name="chelsea", file="chelsea.png", captions=[
        "A close-up of a tabby cat's face with yellow-green eyes and a pink nose.",
        "Close-up portrait of Chelsea, a brown striped tabby cat with long white whiskers.",
    ], conversations=[
        ["<image>\nWhat animal is this?",
         "It is a cat, a tabby with brown fur and dark stripes.",
         "What colour are its eyes?",
         "Its eyes are yellowish green with large black pupils."],
        ["<image>\nDescribe the picture.",
         "The picture is a close-up of a tabby cat's face, which fills most of the frame. You can see the stripes on "
         "its forehead, two large green eyes, a pinkish nose and long white whiskers. The background on the right is "
         "blurred and light coloured."],
        ["I want to adopt a cat. Is tabby a breed?",
         "No. Tabby is a coat pattern, not a breed: it means a coat with stripes, swirls or spots. Cats of many "
         "different breeds, and many mixed-breed cats, are tabbies.",
         "<image>\nIs this cat a tabby?",
         "Yes. This cat has the striped coat of a tabby, with dark stripes on brown fur across its forehead and "
         "cheeks."],
    ]),
    dict(name="coffee", file="coffee.png", captions=[
        "A cup of espresso on a red saucer with a small metal spoon, on a wooden table.",
        "A dark red cup with a white inside holds coffee with a light brown crema.",
        "An espresso cup and saucer on a worn wooden table, seen from above at an angle.",
    ], conversations=[
        ["<image>\nWhat drink is in the cup?",
         "It looks like a shot of espresso: the cup is small and the coffee has a layer of light brown foam, called "
         "crema, on top.",
         "What is next to the cup?",
         "A small metal spoon lies on the saucer, to the right of the cup."],
        ["<image>\nWhat is the table made of?",
         "The table is made of wood. It is dark brown and looks worn, with scratches and a visible grain."],
        ["<image>\nDescribe the colours in this image.",
         "The cup and the saucer are a deep brownish red and the inside of the cup is white. The coffee is a warm "
         "light brown, the spoon is silver, and the wooden table is dark brown."],
    ]),
    dict(name="coins", file="coins.png", captions=[
        "A black and white photo of twenty-four ancient coins arranged in four rows.",
        "Ancient Greek coins laid out in rows on a dark background, many of them showing a head.",
    ], conversations=[
        ["<image>\nHow many coins are there?",
         "There are 24 coins, arranged in four rows of six.",
         "What is shown on them?",
         "Most of the coins show a head, often seen from the side, and a few show a whole figure. The coins are old "
         "and worn, and their edges are not perfectly round."],
        ["<image>\nAre these modern coins?",
         "No, they look ancient. They are irregular in shape and worn, and their designs of heads and figures are "
         "typical of ancient Greek coins."],
        ["What were coins in ancient Greece made of?",
         "Most ancient Greek coins were struck in silver. Some were made of gold, bronze or electrum, a natural alloy "
         "of gold and silver.",
         "<image>\nCan you tell what metal these coins are made of from this photo?",
         "Not with certainty, because the photo is black and white. The coins look light grey against the dark "
         "background, which would fit silver, but you would need to see their colour to be sure."],
    ]),
    dict(name="horse", file="horse.png", captions=[
        "A black silhouette of a horse standing and facing right, on a white background.",
        "A simple black and white drawing of a horse in profile.",
    ], conversations=[
        ["<image>\nWhat animal is shown?",
         "A horse. It is drawn as a solid black silhouette, standing with its head up and facing to the right.",
         "Can you see its eyes?",
         "No. The whole shape is filled with black, so there are no details inside it. Only the outline of the "
         "head, ears, legs and tail can be seen."],
        ["<image>\nHow many legs of the horse are visible?",
         "All four legs are visible in the silhouette."],
    ]),
    dict(name="hubble_deep_field", file="hubble_deep_field.jpg", captions=[
        "A Hubble Space Telescope deep field: hundreds of distant galaxies scattered across a black sky.",
        "The Hubble eXtreme Deep Field, with small galaxies of many shapes in red, orange, white and blue.",
    ], conversations=[
        ["<image>\nWhat are the bright spots in this picture?",
         "Almost all of them are galaxies, not single stars. This is a Hubble deep field image, a very long exposure "
         "of a tiny patch of sky that shows galaxies billions of light years away.",
         "Why do they have different colours?",
         "The colour depends on the stars in each galaxy and on its distance. Galaxies with many young stars look "
         "blue, those with older stars look yellow or red, and the light of the most distant ones is shifted toward "
         "red because the universe is expanding."],
        ["Which telescope took the famous deep field images?",
         "The Hubble Space Telescope, which has orbited the Earth since 1990.",
         "<image>\nIs this one of those images?",
         "Yes. It is the Hubble eXtreme Deep Field, made by combining many long exposures, and it shows a dense field "
         "of distant galaxies on a black background."],
    ]),
    dict(name="immunohistochemistry", file="ihc.png", captions=[
        "A microscope image of a tissue section stained brown and blue, with large rounded glands.",
        "Immunohistochemistry of colon tissue: glands stained brown, with blue nuclei in the tissue between them.",
    ], conversations=[
        ["<image>\nWhat kind of image is this?",
         "It is a microscope image of a stained tissue section. The brown colour shows where an antibody stain (DAB) "
         "marks a protein, and the blue is hematoxylin, which stains cell nuclei.",
         "Which parts are brown?",
         "The large rounded structures, glands made of tall, tightly packed cells, are stained brown. The tissue "
         "between them is pale, with scattered blue nuclei."],
        ["<image>\nDescribe the image.",
         "This is a histology slide seen under a microscope. Several rounded glands fill much of the image; their "
         "cells are stained brown and contain bluish nuclei. Between the glands is pale connective tissue with small, "
         "elongated blue nuclei, and on the left there is an empty white area."],
    ]),
    dict(name="motorcycle", file="motorcycle_left.png", captions=[
        "A red motorcycle parked on its stand in a garage, with shelves of boxes behind it.",
        "A red Yamaha motorcycle with a black seat stands on a concrete floor in a storage room.",
    ], conversations=[
        ["<image>\nWhat vehicle is this?",
         "It is a red motorcycle with a black seat and a silver engine. The name Yamaha is written on the fuel tank.",
         "Where is it parked?",
         "Indoors, in what looks like a garage or storage room. It stands on a bare concrete floor in front of metal "
         "shelves with cardboard boxes, and there is a wooden bench on the left."],
        ["How does a motorcycle stay upright when it is parked?",
         "It rests on a stand: either a side stand, or kickstand, which lets the bike lean to one side, or a centre "
         "stand, which holds it straight up.",
         "<image>\nWhich kind is this one using?",
         "It is resting on its side stand, a single metal leg that folds down from below the engine."],
        ["<image>\nWhat colour is the motorcycle?",
         "It is mostly red: the fuel tank, the tail section and both mudguards are red, while the seat is black and "
         "the engine and exhaust pipes are silver."],
    ]),
    dict(name="page", file="page.png", captions=[
        "A photo of a printed book page titled \"Region-based segmentation\".",
        "A page of text about finding markers of coins and background in an image, with a line of Python code.",
    ], conversations=[
        ["<image>\nWhat is the title on this page?",
         "The title is \"Region-based segmentation\".",
         "What is the text about?",
         "It explains how to first find markers of the coins and of the background in an image: pixels that can be "
         "labelled unambiguously as object or background, found at the two extreme parts of the histogram of grey "
         "values."],
        ["<image>\nIs there any code on the page?",
         "Yes. At the bottom there is a line of Python: markers = np.zeros_like(coins)"],
        ["<image>\nWhy is the background of the page not evenly white?",
         "The page was photographed under uneven lighting, so some parts of the paper are brighter than others. "
         "This makes a simple global threshold on the grey values a poor way to separate the text from the paper."],
    ]),
    dict(name="retina", file="retina.jpg", captions=[
        "A fundus photograph of a human retina, orange-red with dark red blood vessels branching across it.",
        "The back of a healthy eye: a bright optic disc on the left with blood vessels spreading out from it.",
    ], conversations=[
        ["<image>\nWhat is this image?",
         "It is a fundus photograph, a picture of the retina at the back of the eye, taken through the pupil.",
         "What is the bright spot on the left?",
         "That is the optic disc, where the optic nerve leaves the eye and the main blood vessels enter. The vessels "
         "branch out from it across the retina.",
         "And the darker area in the middle?",
         "That is the macula. The fovea at its centre is the part of the retina that gives sharp central vision."],
        ["<image>\nDoes this retina look healthy?",
         "I cannot give a medical diagnosis, but nothing in the photo looks obviously abnormal: the blood vessels are "
         "clear, and the optic disc and the macula look normal. The image is in fact a reference photo of a normal "
         "left eye."],
    ]),
    dict(name="rocket", file="rocket.jpg", captions=[
        "A white rocket stands on the launch pad at dusk between tall lattice towers.",
        "A Falcon 9 rocket on its launch pad under a deep blue evening sky, with bright lights at its base.",
    ], conversations=[
        ["<image>\nWhat is in the middle of the picture?",
         "A tall white rocket, standing upright on its launch pad.",
         "What are the tall metal structures around it?",
         "They are lattice towers around the launch pad. Towers like these carry lightning protection and lights."],
        ["<image>\nWhat time of day was this photo taken?",
         "Around dusk. The sky is deep blue with a little light left near the horizon, and the floodlights on the pad "
         "are switched on and shine like stars."],
        ["Which company builds the Falcon 9 rocket?",
         "SpaceX builds the Falcon 9. Its first stage is designed to land again and be reused.",
         "<image>\nIs the rocket in this picture a Falcon 9?",
         "Yes. It is a Falcon 9 on its launch pad; the photo was taken before the launch of the DSCOVR satellite in "
         "2015."],
    ]),
    dict(name="brick", file="brick.png", captions=[
        "A grayscale photo of a brick wall seen in perspective.",
        "Rows of long rectangular bricks separated by light mortar lines.",
    ], conversations=[
        ["<image>\nWhat texture is shown here?",
         "A brick wall. The bricks are long rectangles laid in staggered rows and separated by light mortar joints. "
         "The wall is seen in perspective, so the bricks look smaller on one side."],
        ["<image>\nIs the image in colour?",
         "No, it is in shades of grey."],
    ]),
    dict(name="moon", file="moon.png", captions=[
        "A grayscale image of the surface of the Moon with small craters.",
        "A low-contrast view of the lunar surface, with a round crater near the top left.",
    ], conversations=[
        ["<image>\nWhat does this image show?",
         "The surface of the Moon. It is a low-contrast grey image with small craters; the clearest one is a round "
         "crater near the top left corner."],
        ["What made the craters on the Moon?",
         "Most lunar craters were made by the impacts of asteroids and comets. The Moon has almost no air and no "
         "weather, so its craters are not worn away and can last for billions of years.",
         "<image>\nCan you see any craters in this picture?",
         "Yes. There is a clear round crater near the top left, and many smaller pits are scattered across the grey "
         "surface."],
    ]),
    dict(name="colorwheel", file="color.png", captions=[
        "A colour wheel: a disc of rainbow hues that fade to white at the centre, on a black background.",
        "A circular colour wheel with red at the top, green on the right and blue on the lower left.",
    ], conversations=[
        ["<image>\nWhat is this?",
         "It is a colour wheel. The hues change smoothly around the circle, from red at the top through yellow and "
         "green to cyan at the bottom, then blue and magenta, and they fade to white in the centre.",
         "What colour is at the centre?",
         "White.",
         "What is outside the circle?",
         "The corners outside the disc are black."],
        ["<image>\nWhich colour is opposite red on this wheel?",
         "Cyan. Red is at the top of the wheel and cyan is at the bottom, directly across the centre."],
    ]),
    dict(name="logo", file="logo.png", captions=[
        "The scikit-image logo: a circle divided by a white curve into a green half and an orange half.",
        "A round green and orange logo with a drawing of a snake's head and its scales.",
    ], conversations=[
        ["<image>\nWhat colours are used in this logo?",
         "Green and orange, separated by a white S-shaped curve, on a white background.",
         "What is drawn inside it?",
         "The head of a snake, with its scales outlined; the drawing continues across both halves of the circle."],
        ["<image>\nWhich software project uses this logo?",
         "It is the logo of scikit-image, a Python library for image processing."],
    ]),
    dict(name="text", file="text.png", captions=[
        "A grayscale close-up of handwritten mathematics on lined paper, photographed at an angle.",
        "Handwritten equations in dark ink on ruled paper, partly out of focus.",
    ], conversations=[
        ["<image>\nWhat is written on the paper?",
         "Handwritten mathematical formulas in dark ink, with equals signs and what looks like an integral sign. The "
         "paper is photographed at a steep angle and parts of it are blurred, so the formulas are hard to read in "
         "full."],
        ["<image>\nIs this text printed or handwritten?",
         "It is handwritten, on lined paper."],
    ]),
    dict(name="clock", file="clock_motion.png", captions=[
        "A blurry grayscale photo of a round wall clock, smeared sideways by camera motion.",
        "A wall clock on a plain grey wall, blurred horizontally so that its hands cannot be read.",
    ], conversations=[
        ["<image>\nWhat time does the clock show?",
         "I can't tell. The photo is strongly blurred from side to side because the camera moved while it was taken, "
         "so the hands and numbers cannot be read.",
         "How could the image be sharpened?",
         "If the motion of the camera is known, deconvolution with the matching blur kernel can recover much of the "
         "detail. For a new photo, a faster shutter speed or a steadier camera would avoid the blur."],
        ["<image>\nDescribe this image.",
         "A light grey background with a blurry rounded shape in the middle: a wall clock photographed while the "
         "camera was moving horizontally, which smeared it into horizontal streaks."],
    ]),
    dict(name="gravel", file="gravel.png", captions=[
        "A grayscale close-up of gravel: many small stones with sharp edges.",
        "Crushed stone filling the whole frame, seen from above.",
    ], conversations=[
        ["<image>\nWhat is in this picture?",
         "Gravel: a large number of small, angular stones packed closely together, seen from above in grayscale."],
        ["What is gravel used for?",
         "Gravel is used for paths and driveways, for drainage, and as an ingredient of concrete.",
         "<image>\nWould the stones in this photo be comfortable to walk on barefoot?",
         "Probably not. They are angular crushed stones with sharp edges, not smooth rounded pebbles."],
    ]),
    dict(name="grass", file="grass.png", captions=[
        "A grayscale close-up of grass with a few small leaves among the blades.",
        "Dense grass photographed from above in black and white.",
    ], conversations=[
        ["<image>\nWhat does this image show?",
         "A patch of grass seen from above, in black and white. Thin blades cover the whole frame, with some small "
         "rounded leaves between them."],
        ["<image>\nIs there anything in the picture besides plants?",
         "No, the whole frame is filled with grass blades and small leaves; there is no sky, soil or object visible."],
    ]),
    dict(name="cell", file="cell.png", captions=[
        "A quantitative phase image of a single cell floating in saline, seen as a bright round spot.",
        "A grayscale microscopy image with one bright round cell right of centre and faint bands in the background.",
    ], conversations=[
        ["<image>\nWhat is the bright circle?",
         "It is a single cell floating in saline. This is a quantitative phase image computed from a digital "
         "hologram, and the cell appears brighter than the background because it delays the light passing through "
         "it more than the surrounding liquid does.",
         "Why does the background have faint stripes?",
         "The bands are an artifact of the imaging, not real structures. They make it harder to separate the cell "
         "from the background with a single threshold."],
        ["<image>\nHow many cells are in the image?",
         "One. There is a single bright round cell to the right of the centre."],
    ]),
]

# Language-only dialogues: alternating human/gpt values, or explicit (role, value) turns.
DIALOGUES: List = [
    ["What is the capital of France?", "The capital of France is Paris.",
     "And of Italy?", "Rome is the capital of Italy."],
    ["How many days are there in a leap year?", "A leap year has 366 days; the extra day is February 29."],
    ["Write a Python function that returns the square of a number.",
     "Here is a simple version:\n\ndef square(x):\n    return x * x\n\nFor example, square(4) returns 16."],
    ["What is photosynthesis?",
     "Photosynthesis is the process by which plants, algae and some bacteria use the energy of light to turn carbon "
     "dioxide and water into sugar, releasing oxygen."],
    ["Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'.",
     "And into German?", "In German it is 'Guten Morgen'."],
    ["What is 12 times 12?", "12 times 12 is 144.", "And 144 divided by 3?", "144 divided by 3 is 48."],
    ["Why is the sky blue?",
     "Sunlight is scattered by the molecules in the air, and short wavelengths are scattered much more strongly than "
     "long ones. Blue light is therefore spread across the whole sky, which makes it look blue during the day."],
    ["Give me three tips for sleeping better.",
     "1. Go to bed and get up at the same times every day.\n2. Keep the bedroom dark, quiet and cool.\n3. Avoid "
     "caffeine in the afternoon and bright screens just before bed."],
    ["What is the boiling point of water at sea level?",
     "At sea level, water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit."],
    ["Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet, probably in the mid-1590s."],
    ["What is the difference between a list and a tuple in Python?",
     "A list is mutable: you can change, add and remove its elements. A tuple is immutable: once it is created it "
     "cannot change. Lists are written with square brackets, [1, 2], and tuples with parentheses, (1, 2)."],
    ["How many continents are there?",
     "By the most common convention there are seven: Africa, Antarctica, Asia, Australia, Europe, North America and "
     "South America."],
    ["Summarize the water cycle in two sentences.",
     "Water evaporates from oceans, lakes and plants, rises as vapour and condenses into clouds. It falls back as "
     "rain or snow and flows through rivers and the ground to the sea, where the cycle starts again."],
    ["What does CPU stand for?",
     "CPU stands for central processing unit, the part of a computer that executes the instructions of programs.",
     "And GPU?",
     "GPU stands for graphics processing unit. It was designed for graphics but is now widely used for other highly "
     "parallel work, such as training neural networks."],
    [("system", "You are a concise assistant. Answer in one sentence."),
     ("human", "What is a prime number?"),
     ("gpt", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.")],
    ["Is a tomato a fruit or a vegetable?",
     "Botanically a tomato is a fruit, because it develops from the flower and contains the seeds. In cooking it is "
     "usually treated as a vegetable."],
    ["Convert 5 kilometres to miles.", "5 kilometres is about 3.11 miles, since one kilometre is about 0.621 miles."],
    ["What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system.",
     "Is it a rocky planet?",
     "No. Jupiter is a gas giant, made mostly of hydrogen and helium, without a solid surface like the Earth's."],
    ["Write a haiku about autumn.",
     "Crisp leaves drift and fall\nGolden light on quiet paths\nThe year breathes out slow"],
    ["What is the chemical symbol for gold?", "The chemical symbol for gold is Au, from the Latin word aurum."],
    ["Explain what a neural network is in simple terms.",
     "A neural network is a computer program made of many simple connected units arranged in layers. Each unit "
     "combines its inputs using adjustable weights, and during training the weights are changed step by step so "
     "that the outputs of the network get closer to the correct answers for the examples it sees."],
    [("user", "How do I reverse a string in Python?"),
     ("assistant", "Use slicing with a step of -1: text[::-1]. For example, 'abc'[::-1] gives 'cba'.")],
    ["What is the freezing point of water in Fahrenheit?",
     "Water freezes at 32 degrees Fahrenheit, which is 0 degrees Celsius."],
    ["Can you suggest a name for a small bakery?",
     "How about \"The Rising Loaf\"? It is short and friendly and hints at fresh bread.",
     "Something more playful?", "Try \"Knead to Know\", a pun on \"need to know\"."],
    ["How far is the Moon from the Earth?",
     "On average the Moon is about 384,400 kilometres, or about 238,900 miles, from the Earth."],
    ["What is the past tense of 'run'?", "The past tense of 'run' is 'ran', and the past participle is 'run'."],
    ["How many sides does a hexagon have?", "A hexagon has six sides.", "And an octagon?", "An octagon has eight."],
    ["Tell me a fun fact about octopuses.",
     "An octopus has three hearts: two pump blood through the gills and the third pumps it to the rest of the body."],
    ["What is the speed of light?",
     "In a vacuum, light travels at 299,792,458 metres per second, about 300,000 kilometres per second."],
    ["Write a SQL query that counts the rows in a table called users.",
     "SELECT COUNT(*) FROM users;\n\nThis returns a single number: the count of all rows in the users table."],
    ["What language is spoken in Brazil?", "The official language of Brazil is Portuguese."],
    [("system", "You are a friendly tutor for children."),
     ("user", "Why do we have seasons?"),
     ("assistant", "Because the Earth is tilted. As it travels around the Sun, first one half and then the other "
      "leans toward the Sun and gets more direct sunlight, which makes summer there, while the half leaning away "
      "has winter.")],
]


def skimage_data_dir() -> str:
    """The data folder inside the installed scikit-image wheel (found without importing skimage)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _turns(values: List) -> List[Dict]:
    if values and isinstance(values[0], tuple):
        return [{"from": role, "value": value} for role, value in values]
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def demo_samples() -> Dict[str, List[Dict]]:
    """The three JSON datasets, as Python lists (image paths relative to the dataset folder)."""
    stage1, instruct = [], []
    for item in IMAGES:
        image = "images/" + item["name"] + os.path.splitext(item["file"])[1]
        for i, caption in enumerate(item["captions"]):
            stage1.append({"id": f"{item['name']}-cap{i}", "image": image, "conversations": [
                {"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": caption}]})
        for i, values in enumerate(item["conversations"]):
            instruct.append({"id": f"{item['name']}-conv{i}", "image": image, "conversations": _turns(values)})
    sharegpt = [{"id": f"text-{i}", "conversations": _turns(v)} for i, v in enumerate(DIALOGUES)]
    return {"llava_stage1": stage1, "llava_instruct": instruct, "sharegpt": sharegpt}


def tokenizer_texts(datasets: Dict[str, List[Dict]]) -> List[str]:
    """The text chunks the templates produce for every sample (so the system prompts and role tags, which are in
    every sample, get few tokens), split at "<image>", "<s>" and "</s>" as the encoder splits them."""
    texts = []
    for name, samples in datasets.items():
        for s in samples:
            for template in (("plain",) if name == "llava_stage1" else ()) + ("vicuna_v1", "llama_2"):
                prompt = render_prompt(s["conversations"], template)
                texts += [t for t in re.split(r"<image>|</s>|<s>", prompt) if t.strip()]
    return texts


def build_demo_dataset(out_dir: str) -> Dict[str, str]:
    """Write the demo dataset into ``out_dir``; returns the paths (keys: root, images, llava_stage1,
    llava_instruct, sharegpt, tokenizer)."""
    src = skimage_data_dir()
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    for item in IMAGES:
        path = os.path.join(src, item["file"])
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} is missing: the demo needs the images shipped in the scikit-image wheel")
        shutil.copyfile(path, os.path.join(images, item["name"] + os.path.splitext(item["file"])[1]))
    datasets = demo_samples()
    paths = {"root": out_dir, "images": images}
    for name, samples in datasets.items():
        paths[name] = os.path.join(out_dir, name + ".json")
        with open(paths[name], "w", encoding="utf-8") as f:
            json.dump(samples, f, indent=1, ensure_ascii=False)
            f.write("\n")
    paths["tokenizer"] = train_sentencepiece(tokenizer_texts(datasets), os.path.join(out_dir, "tokenizer"),
                                             TOKENIZER_VOCAB)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m megallava.data.demo_data OUT_DIR")
    print(json.dumps(build_demo_dataset(sys.argv[1]), indent=1))
