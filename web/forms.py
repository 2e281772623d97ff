"""The pages' forms (Flask-WTF: every one carries the CSRF token). Hub checks happen in web/merge.py and
web/rules.py, shared with the JSON API; these classes only bound and shape the input."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    FieldList,
    Form,
    FormField,
    HiddenField,
    PasswordField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.validators import DataRequired, Length, Optional, Regexp

from worker.engine.recipe.recipe import METHODS
from worker.jobs.request import FROM_QUANTIZED, GGUF_OUTTYPES

DTYPES = ("auto", "bfloat16", "float16", "float32")
#: the form's output choice → MergeRequest.formats (the API takes the list itself)
FORMAT_CHOICES = {"safetensors": ("safetensors",), "gguf": ("gguf",), "both": ("safetensors", "gguf")}
_DTYPE_CHOICES = list(DTYPES)  # plain values (labels = values): no tuples, which WTForms 3.3 deprecates


class TokenForm(FlaskForm):
    token = PasswordField("Hugging Face token", validators=[DataRequired(), Length(max=512)])


class _PublishForm(FlaskForm):
    """Where and how both merge modes publish."""

    target = StringField("Target repo", validators=[DataRequired(), Length(max=200)])
    private = BooleanField("Private")
    # "1" until the user touches the checkbox (the page's JS sets "0"): an unticked box then means "as private as
    # the inputs", so a private adapter is never published publicly by a box left at its default
    private_auto = HiddenField(default="1")
    dtype = SelectField("dtype", choices=_DTYPE_CHOICES, default="auto")
    overwrite = BooleanField("Overwrite the weights already there")
    create_pr = BooleanField("Open a pull request instead of committing to main")
    formats = SelectField("Output", choices=list(FORMAT_CHOICES), default="safetensors")
    gguf_outtype = SelectField("GGUF type", choices=list(GGUF_OUTTYPES), default="f16")


class MergeForm(_PublishForm):
    adapter = StringField("Adapter repo", validators=[DataRequired(), Length(max=200)])
    adapter_revision = StringField("Adapter revision", validators=[Optional(), Length(max=200)])
    base = StringField("Base model", validators=[Optional(), Length(max=200)])
    base_revision = StringField("Base revision", validators=[Optional(), Length(max=200)])
    from_quantized = SelectField("4-bit base", choices=list(FROM_QUANTIZED), default="original")
    keep_quantization = BooleanField("Keep FP8 (an FP8 base's merge written back in FP8)")


class RecipeRow(Form):
    """One input of a recipe: a model, optionally with a LoRA adapter folded into it, and its parameters."""

    model = StringField("Model", validators=[Optional(), Length(max=200)])
    adapter = StringField("+ adapter", validators=[Optional(), Length(max=200)])
    weight = StringField("Weight", validators=[Optional(), Length(max=40)])
    density = StringField("Density", validators=[Optional(), Length(max=40)])


RECIPE_ROWS = 16
_CHOICE = ["default", "true", "false"]


class RecipeForm(_PublishForm):
    """The merge page's recipe mode: rows of model[+adapter] and weight, a method and its parameters, or YAML."""

    # passthrough stacks layer ranges (`slices`), which rows of whole models cannot say: it runs from pasted YAML
    method = SelectField("Method", choices=[m for m in METHODS if m != "passthrough"], default="linear")
    base_model = StringField("Base model", validators=[Optional(), Length(max=200)])
    rows = FieldList(FormField(RecipeRow), min_entries=3, max_entries=RECIPE_ROWS)
    normalize = SelectField("normalize", choices=_CHOICE, default="default")
    rescale = SelectField("rescale", choices=_CHOICE, default="default")
    lambda_ = StringField("lambda", validators=[Optional(), Length(max=40)])
    t = StringField("t", validators=[Optional(), Length(max=40)])
    seed = StringField("Seed", validators=[Optional(), Regexp(r"^\d{1,18}$", message="seed: a whole number")])
    yaml = TextAreaField("Recipe YAML", validators=[Optional(), Length(max=60_000)])


class RuleForm(FlaskForm):
    watch = StringField("Watch", validators=[Optional(), Length(max=200)])  # required unless recipe (web/rules.py)
    target = StringField("Target", validators=[Optional(), Length(max=200)])
    base = StringField("Base model", validators=[Optional(), Length(max=200)])
    base_revision = StringField("Base revision", validators=[Optional(), Length(max=200)])
    bases = StringField("Allowed bases", validators=[Optional(), Length(max=4200)])
    private = BooleanField("Private")
    dtype = SelectField("dtype", choices=_DTYPE_CHOICES, default="auto")
    keep_quantization = BooleanField("Keep FP8")  # a rule's bitsandbytes base is always dequantized (pipeline.py)
    formats = SelectField("Output", choices=list(FORMAT_CHOICES), default="safetensors")
    gguf_outtype = SelectField("GGUF type", choices=list(GGUF_OUTTYPES), default="f16")
    token = PasswordField("Personal access token", validators=[Optional(), Length(max=512)])
    recipe = TextAreaField("Recipe", validators=[Optional(), Length(max=60_000)])


class ActionForm(FlaskForm):
    """Buttons (cancel, retry, delete, sign out): nothing but the CSRF token."""
