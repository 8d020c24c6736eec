"""CHATSVC_PRICES: the price table read (inline or from a file, every mistake one sentence naming
the setting and the bad place), and what a call costs in micros (Decimal, rounded up): tiers by the
prompt's tokens (a prompt of exactly a tier's bound stays below it), the thinking rate, cached input,
patterns."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

import chatsvc
from chatsvc import Prices, Source, Spent

TABLE = {
    "currency": "CNY",
    "models": {
        "qwen-plus": {
            "input": 0.8,
            "output": 2,
            "output_thinking": 8,
            "cached_input": "0.2",
            "tiers": [
                {"above_input_tokens": 131072, "input": 2.4, "output": 20, "output_thinking": 24, "cached_input": 0.5},
                {"above_input_tokens": 262144, "input": 4.8, "output": 48},
            ],
        },
        "qwen-flash": {"input": 0.15, "output": 1.5, "cached_input": 0.03},
        "qwen3-*": {"input": 1, "output": 4},
        "qwen3-coder-*": {"input": 3, "output": 12},
    },
}


@pytest.fixture
def prices() -> Prices:
    return Prices.parse(json.dumps(TABLE))


def reported(prompt: int, completion: int, reasoning: int | None = None, cached: int | None = None) -> Spent:
    return Spent(Source.REPORTED, prompt, completion, prompt + completion, reasoning, cached)


def test_the_table_is_read_in_decimals(prices):
    assert prices.currency == "CNY"
    base, second, third = prices.models["qwen-plus"]
    assert (base.input, base.output, base.output_thinking, base.cached_input) == (
        Decimal("0.8"), Decimal(2), Decimal(8), Decimal("0.2"),
    )  # fmt: skip
    assert base.above_input_tokens == 0 and second.above_input_tokens == 131072
    # a tier without output_thinking or cached_input: its own output and input
    assert (third.output_thinking, third.cached_input) == (Decimal(48), Decimal("4.8"))
    flash = prices.models["qwen-flash"][0]
    assert flash.output_thinking == flash.output == Decimal("1.5") and flash.cached_input == Decimal("0.03")


def test_exact_micros_rounded_up_once(prices):
    # 22 x 0.8 + 17 x 2 = 17.6 + 34 = 51.6 micros -> 52
    assert prices.cost("qwen-plus", reported(22, 17), thinking=False) == 52
    # 1,000,000 prompt tokens at 0.15 and 1,000,000 output at 1.5: exactly the prices per million
    assert prices.cost("qwen-flash", reported(1_000_000, 1_000_000), thinking=False) == 1_650_000
    # a third of a micro is a micro; nothing is nothing
    assert prices.cost("qwen-flash", reported(2, 0), thinking=False) == 1  # 0.3
    assert prices.cost("qwen-flash", reported(0, 0), thinking=False) == 0
    assert prices.cost("qwen-plus", Spent(Source.NONE), thinking=True) == 0


def test_tiers_are_chosen_by_the_prompt_and_the_bound_stays_below(prices):
    # exactly 131072 prompt tokens: the lower tier, for every token of the call
    assert prices.rate("qwen-plus", 131072).above_input_tokens == 0
    assert prices.cost("qwen-plus", reported(131072, 1000), thinking=False) == math_ceil(
        Decimal(131072) * Decimal("0.8") + 1000 * 2
    )
    # one more: the whole call, output too, at the second tier
    assert prices.rate("qwen-plus", 131073).above_input_tokens == 131072
    assert prices.cost("qwen-plus", reported(131073, 1000), thinking=False) == math_ceil(
        Decimal(131073) * Decimal("2.4") + 1000 * 20
    )
    assert prices.rate("qwen-plus", 262144).above_input_tokens == 131072
    assert prices.rate("qwen-plus", 262145).above_input_tokens == 262144
    assert prices.rate("qwen-plus", 0).above_input_tokens == 0


def test_a_call_that_thought_has_all_its_output_at_the_thinking_rate(prices):
    # 100 prompt x 0.8 + 300 output x 8 = 80 + 2400
    assert prices.cost("qwen-plus", reported(100, 300), thinking=True) == 2480
    # reasoning tokens reported: thinking, whatever the caller saw
    assert prices.cost("qwen-plus", reported(100, 300, reasoning=250), thinking=False) == 2480
    assert prices.cost("qwen-plus", reported(100, 300, reasoning=0), thinking=False) == 680
    # in the second tier: its own thinking rate
    assert prices.cost("qwen-plus", reported(200_000, 10), thinking=True) == 200_000 * Decimal("2.4") + 240
    # a model without output_thinking: the same price either way
    assert prices.cost("qwen-flash", reported(10, 10), thinking=True) == prices.cost(
        "qwen-flash", reported(10, 10), thinking=False
    )


def test_cached_prompt_tokens_at_the_cached_rate(prices):
    # design 1.1's implicit-cache hit: 3019 prompt tokens of which 2048 cached, 104 output
    # (3019 - 2048) x 0.8 + 2048 x 0.2 + 104 x 2 = 776.8 + 409.6 + 208 = 1394.4 -> 1395
    assert prices.cost("qwen-plus", reported(3019, 104, cached=2048), thinking=False) == 1395
    # a model without cached_input: cached at the input price
    assert prices.cost("qwen3-32b", reported(3019, 104, cached=2048), thinking=False) == 3019 + 416
    # more cached than the prompt (a server's mistake) counts no more than the prompt
    assert prices.cost("qwen-plus", reported(10, 0, cached=50), thinking=False) == 2


def test_patterns_match_the_rest_the_longest_first_and_the_exact_name_wins(prices):
    assert prices.rate("qwen3-32b", 10).input == 1
    assert prices.rate("qwen3-coder-plus", 10).input == 3  # the longer pattern
    assert prices.rate("qwen-plus", 10).input == Decimal("0.8")
    table = {
        "currency": "USD",
        "models": {"qwen-plus*": {"input": 1, "output": 1}, "qwen-plus": {"input": 2, "output": 2}},
    }
    both = Prices.parse(json.dumps(table))
    assert both.rate("qwen-plus", 1).input == 2 and both.rate("qwen-plus-latest", 1).input == 1
    assert both.rate("qwen-plu", 1) is None


def test_a_model_without_a_price_costs_none_and_holds_nothing(prices, caplog):
    assert prices.cost("deepseek-r1", reported(10, 10), thinking=False) is None
    assert prices.hold("deepseek-r1", 10, 10) == 0
    assert "deepseek-r1 has no price" in caplog.text


def test_what_a_call_holds(prices):
    # 1000 prompt x 0.8 + 4096 output at the higher of output (2) and output_thinking (8): whether a call
    # thinks is known only once it has, and a hold errs high
    assert prices.hold("qwen-plus", 1000, 4096) == 800 + 4096 * 8
    assert prices.hold("qwen-flash", 3, 1) == 2  # 0.45 + 1.5 = 1.95
    assert prices.hold("qwen-plus", 131073, 10) == math_ceil(131073 * Decimal("2.4") + 240)
    assert prices.hold("qwen-plus", 262145, 10) == math_ceil(262145 * Decimal("4.8") + 480)


def test_money_is_shown_to_six_places():
    assert chatsvc.money(1395) == 0.001395
    assert chatsvc.money(1_650_000) == 1.65
    assert chatsvc.money(0) == 0


def test_the_table_is_read_from_a_file(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(TABLE))
    assert Prices.parse(str(path)) == Prices.parse(json.dumps(TABLE))
    assert Prices.parse(f"  {path}\n").currency == "CNY"


@pytest.mark.parametrize(
    "table, said",
    [
        ("{", "CHATSVC_PRICES: not valid JSON (line 1, column 2)."),
        ("[]", None),  # a path that does not exist
        ({"models": {}}, "CHATSVC_PRICES: the table needs currency."),
        ({"currency": "CNY"}, "CHATSVC_PRICES: the table needs models."),
        ({"currency": "", "models": {}}, "CHATSVC_PRICES: currency must be a currency's code, such as CNY or USD."),
        (
            {"currency": "CNY", "models": []},
            "CHATSVC_PRICES: models must be an object of model names and their prices.",
        ),
        (
            {"currency": "CNY", "models": {}, "extra": 1},
            "CHATSVC_PRICES: extra is not a field it takes (currency, models).",
        ),
        ({"currency": "CNY", "models": {"qwen-plus": 1}}, "CHATSVC_PRICES: models.qwen-plus must be an object."),
        ({"currency": "CNY", "models": {"qwen-plus": {"input": 1}}}, "CHATSVC_PRICES: models.qwen-plus needs output."),
        (
            {"currency": "CNY", "models": {"qwen-plus": {"input": 1, "output": -2}}},
            "CHATSVC_PRICES: models.qwen-plus.output must be a number of at least 0.",
        ),
        (
            {"currency": "CNY", "models": {"qwen-plus": {"input": "cheap", "output": 2}}},
            "CHATSVC_PRICES: models.qwen-plus.input must be a number of at least 0.",
        ),
        (
            {"currency": "CNY", "models": {"qwen-plus": {"input": True, "output": 2}}},
            "CHATSVC_PRICES: models.qwen-plus.input must be a number of at least 0.",
        ),
        (
            {"currency": "CNY", "models": {"qwen-plus": {"input": "NaN", "output": 2}}},
            "CHATSVC_PRICES: models.qwen-plus.input must be a number of at least 0.",
        ),
        (
            {"currency": "CNY", "models": {"qwen-plus": {"input": 1, "output": 2, "cache": 1}}},
            "CHATSVC_PRICES: models.qwen-plus.cache is not a field it takes"
            " (input, output, output_thinking, cached_input, tiers).",
        ),
        (
            {"currency": "CNY", "models": {"qw*en": {"input": 1, "output": 2}}},
            "CHATSVC_PRICES: models.qw*en must be a model's name, or a prefix ending in '*'.",
        ),
        (
            {"currency": "CNY", "models": {"qwen-plus": {"input": 1, "output": 2, "tiers": {}}}},
            "CHATSVC_PRICES: models.qwen-plus.tiers must be a list of tiers.",
        ),
        (
            {
                "currency": "CNY",
                "models": {"qwen-plus": {"input": 1, "output": 2, "tiers": [{"input": 1, "output": 2}]}},
            },
            "CHATSVC_PRICES: models.qwen-plus.tiers[0] needs above_input_tokens.",
        ),
        (
            {
                "currency": "CNY",
                "models": {
                    "qwen-plus": {
                        "input": 1,
                        "output": 2,
                        "tiers": [
                            {"above_input_tokens": 100, "input": 1, "output": 2},
                            {"above_input_tokens": 100, "input": 1, "output": 2},
                        ],
                    }
                },
            },
            "CHATSVC_PRICES: models.qwen-plus.tiers[1].above_input_tokens must be a whole number above 100 (tiers go"
            " from the fewest input tokens up).",
        ),
        (
            {
                "currency": "CNY",
                "models": {
                    "m": {"input": 1, "output": 2, "tiers": [{"above_input_tokens": 10, "input": 1, "output": 1.5e400}]}
                },
            },
            "CHATSVC_PRICES: models.m.tiers[0].output must be a number of at least 0.",
        ),
        (
            {"currency": "CNY", "models": {"qwen-plus": {"input": "1e7", "output": 2}}},
            "CHATSVC_PRICES: models.qwen-plus.input must be at most 1000000 (a price per million tokens).",
        ),
    ],
)
def test_each_mistake_is_one_sentence_naming_the_setting_and_the_place(table, said):
    value = table if isinstance(table, str) else json.dumps(table)
    with pytest.raises(ValueError) as caught:
        Prices.parse(value)
    message = str(caught.value)
    assert message.startswith("CHATSVC_PRICES: ") and message.endswith(".") and "\n" not in message
    if said is not None:
        assert message == said
    # the same sentence, whole, from the settings
    with pytest.raises(ValueError) as caught:
        chatsvc.Settings.from_env({"CHATSVC_PRICES": value}, env_file=None)
    assert str(caught.value) == message


def test_a_file_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ValueError) as caught:
        Prices.parse(str(tmp_path / "missing.json"))
    assert (
        str(caught.value)
        == f"CHATSVC_PRICES: cannot read the file {str(tmp_path / 'missing.json')!r} (No such file or directory)."
    )


def test_the_settings_hold_the_table(tmp_path):
    settings = chatsvc.Settings.from_env({"CHATSVC_PRICES": json.dumps(TABLE)}, env_file=None)
    assert settings.prices == Prices.parse(json.dumps(TABLE))
    assert chatsvc.Settings.from_env({}, env_file=None).prices is None


def math_ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding="ROUND_CEILING"))
