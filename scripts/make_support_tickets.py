"""Writes examples/support_tickets/{train,val,test}.csv: short customer-support messages, each labelled with one of
four intents (billing, shipping, technical, account), for the worked example in docs/own_data.md.

Deterministic (a fixed seed), so the committed files can be rebuilt byte for byte:
    .venv/bin/python scripts/make_support_tickets.py
Every message is one opening, one intent-specific complaint or request and sometimes a closing, drawn from small
word lists (a few mention another intent's words, e.g. a shipping fee in a shipping complaint); the splits hold
different draws (no message is in two splits), and val and test also use phrasings train never has, so their
scores say how well a model carries an intent over to new wording."""

from __future__ import annotations

import csv
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples" / "support_tickets"
SIZES = {"train": 400, "val": 120, "test": 120}
SEED = 7
UNSEEN = 3  # the last templates of each intent appear in val and test only: phrasings the model never trained on

OPENINGS = ["", "", "Hi,", "Hello,", "Hey there,", "Good morning,", "Dear support,", "Quick question:", "Urgent:"]
CLOSINGS = ["", "", "", "Thanks.", "Please help.", "Thank you!", "Any update?", "Cheers.", "This is frustrating."]
THINGS = ["order", "package", "parcel", "delivery", "shipment"]
PLANS = ["subscription", "plan", "membership", "account", "premium plan"]
DEVICES = ["the app", "the website", "the mobile app", "the desktop client", "the dashboard", "the checkout page"]
AMOUNTS = ["$12", "$49.99", "twice", "the wrong amount", "$100", "an extra fee", "a late fee"]
WHENS = ["yesterday", "last week", "on Monday", "three days ago", "this morning", "two weeks ago"]

TEMPLATES = {
    "billing": [
        "I was charged {amount} for my {plan} {when}.",
        "My card was billed {amount} but I cancelled my {plan}.",
        "Why does my invoice show {amount}?",
        "Can I get a refund for the {plan} charge from {when}?",
        "The payment for my {plan} went through {amount}.",
        "Please send me a receipt for the charge {when}.",
        "I want to change the credit card on my {plan}.",
        "There is a charge on my statement I do not recognise.",
        "You double charged me for the {plan}.",
        "How do I update my billing address for invoices?",
        "I paid for express delivery {when} and was charged {amount} instead.",
        "The app charged me {amount} for a {thing} I never received, I want my money back.",
    ],
    "shipping": [
        "Where is my {thing}? It was supposed to arrive {when}.",
        "My {thing} has not arrived yet.",
        "The tracking number for my {thing} does not work.",
        "Can you ship my {thing} to a different address?",
        "The courier says my {thing} was delivered but it is not here.",
        "My {thing} arrived damaged.",
        "How long does delivery take to Canada?",
        "The {thing} I got {when} is missing an item.",
        "Can I pick up my {thing} at the store instead?",
        "Tracking shows my {thing} stuck in transit since {when}.",
        "I paid {amount} for shipping and my {thing} is still not here.",
        "I cannot log in to the courier site, where is my {thing}?",
    ],
    "technical": [
        "{device} crashes every time I open it.",
        "I get an error 500 on {device}.",
        "{device} is very slow since {when}.",
        "The login button on {device} does nothing.",
        "{device} shows a blank screen after the update.",
        "Notifications stopped working in {device} {when}.",
        "I cannot upload files in {device}, it keeps spinning.",
        "{device} freezes when I try to save.",
        "Dark mode is broken on {device}.",
        "Search in {device} returns no results at all.",
        "The payment page on {device} shows an error when I click pay.",
        "The tracking page on {device} will not load.",
    ],
    "account": [
        "I forgot my password and the reset email never came.",
        "How do I change the email address on my {plan}?",
        "Please delete my {plan} and all my data.",
        "My {plan} was locked after too many login attempts.",
        "I want to change my username.",
        "Someone else logged into my {plan} {when}.",
        "How do I turn on two-factor authentication?",
        "Can I merge my two {plan}s into one?",
        "I cannot verify my phone number for my {plan}.",
        "Please update the name on my profile.",
        "I cannot log in to see my invoices, my password is rejected.",
        "How do I change the delivery address saved in my {plan} profile?",
    ],
}


def message(rng: random.Random, intent: str, split: str) -> str:
    templates = TEMPLATES[intent][:-UNSEEN] if split == "train" else TEMPLATES[intent]
    body = rng.choice(templates).format(
        amount=rng.choice(AMOUNTS),
        plan=rng.choice(PLANS),
        when=rng.choice(WHENS),
        thing=rng.choice(THINGS),
        device=rng.choice(DEVICES),
    )
    body = body[0].upper() + body[1:]
    parts = [rng.choice(OPENINGS), body, rng.choice(CLOSINGS)]
    return " ".join(part for part in parts if part)


def main() -> None:
    rng = random.Random(SEED)
    intents = sorted(TEMPLATES)
    seen: set[str] = set()
    OUT.mkdir(parents=True, exist_ok=True)
    for split, size in SIZES.items():
        rows: list[dict[str, str]] = []
        while len(rows) < size:
            intent = intents[len(rows) % len(intents)]
            text = message(rng, intent, split)
            if text not in seen:
                seen.add(text)
                rows.append({"id": f"{split}-{len(rows):04d}", "text": text, "label": intent})
        rng.shuffle(rows)
        with (OUT / f"{split}.csv").open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["id", "text", "label"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        print(f"{OUT / f'{split}.csv'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
