//! A Hugging Face encoder `config.json` (BERT, RoBERTa, MPNet, DistilBERT): the fields the
//! architecture reads, checked before anything is allocated from them; and [`EncoderFamily`],
//! the table of what the families name and do differently around the shared layer body.

use crate::io::IoError;
use crate::nn::head::HeadActivation;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a Hugging Face BERT `config.json` that the architecture needs (RoBERTa and
/// MPNet use the same keys; a DistilBERT config is read from its own keys into these).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    /// `bert` (also when absent), `roberta`, `mpnet` or `distilbert`: see [`EncoderFamily`].
    #[serde(default)]
    pub model_type: Option<String>,
    /// MPNet's relative position buckets.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Dropout in the classification head (transformers' `classifier_dropout`, DistilBERT's
    /// `seq_classif_dropout`); None: `hidden_dropout_prob`, as transformers does.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Dropout before the question-answering head's `qa_outputs` (DistilBERT's `qa_dropout`;
    /// BERT's, RoBERTa's and MPNet's QA models have none).
    #[serde(default)]
    pub qa_dropout: Option<f64>,
    /// ViT's image geometry (read from its own keys); None for the text encoders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageGeometry>,
}

/// A ViT's input: square images of `image_size` pixels and `num_channels` channels, cut into
/// `patch_size` x `patch_size` patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageGeometry {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
}

impl ImageGeometry {
    /// Patches per image (the sequence has one more: the `[CLS]` token).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Values of one flattened patch (`channels * patch * patch`).
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }
}

/// The encoders that share BERT's layer body (post-LN attention, GELU MLP, six linears) and
/// differ in what is around it: tensor names, positions, token types, the classification head.
/// Every difference is a method here, read by the loader, LoRA, PEFT files and merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderFamily {
    Bert,
    /// RoBERTa: BERT's names under `roberta.`, positions counted from `pad_token_id + 1`, a
    /// one-row token type table, and its own head (`classifier.dense` + `classifier.out_proj`).
    Roberta,
    /// MPNet: its own tensor names, no token types, positions counted from `pad_token_id + 1`
    /// (as RoBERTa), a relative position bias added to every layer's attention scores, and
    /// RoBERTa's head.
    MPNet,
    /// DistilBERT: its own names and config keys, no token types, no dropout after the attention
    /// output, and its head (`pre_classifier`, ReLU, `classifier`).
    DistilBert,
    /// ViT (`ViTForImageClassification`): pre-LN layers (`layernorm_before` / `layernorm_after`)
    /// under `vit.`, patch embeddings instead of tokens, and a head of the final `layernorm` and
    /// `classifier` on the `[CLS]` token (`model::vit`).
    ViT,
}

/// A family's classification head on the first token, as its `...ForSequenceClassification`
/// names it: `[dropout] -> dense -> activation -> dropout -> out`.
#[derive(Clone, Copy, Debug)]
pub struct HeadSpec {
    /// The dense layer's module path: BERT's pooler (`pooler.dense`, in the base model and so
    /// under its prefix), RoBERTa's and MPNet's `classifier.dense`, DistilBERT's `pre_classifier`
    /// (both at the task model's root).
    pub dense: &'static str,
    pub activation: HeadActivation,
    /// Whether the dense layer trains with the output layer. PEFT's `modules_to_save` for a
    /// sequence classifier is `classifier`, which is RoBERTa's whole head and, by PEFT's suffix
    /// match, also DistilBERT's `pre_classifier`; BERT's pooler stays frozen.
    pub dense_trains: bool,
    /// Dropout on the first token before the dense layer (RoBERTa's and MPNet's heads).
    pub dropout_first: bool,
    /// The output layer's module path (`[num_labels, hidden]`), at the task model's root.
    pub out: &'static str,
}

/// One family's row of the table: what it names and does differently around the shared layer.
#[derive(Debug)]
pub struct FamilySpec {
    /// Its `model_type` in `config.json` (`bert` also when absent).
    pub model_type: &'static str,
    /// transformers' sequence classifier (`architectures` of a merged model).
    pub architecture: &'static str,
    /// transformers' extractive question-answering model (`qa_outputs` on the body), which
    /// `--task qa` trains and `merge` writes; None for ViT (an image model).
    pub qa_architecture: Option<&'static str>,
    /// The base model's prefix in the task model (`bert.`): its tensors carry it or not.
    pub prefix: &'static str,
    /// The base model's top-level modules (a bare checkpoint's names start with these).
    pub base_modules: &'static [&'static str],
    /// The layer list's path in the base model.
    pub encoder_layers: &'static str,
    /// PEFT's path of the layer list in the task model (`...ForSequenceClassification`).
    pub layers_path: &'static str,
    /// Paths of the six linears in a layer, in `bert::Site::ALL` order.
    pub site_paths: [&'static str; 6],
    /// The attention block's LayerNorm, then the layer output's (ViT: the LayerNorms before the
    /// attention and before the MLP, see `pre_norm`).
    pub layer_norm_paths: [&'static str; 2],
    /// PEFT's default LoRA targets (the query and value projections).
    pub default_targets: [&'static str; 2],
    /// Whether it has a token type table (RoBERTa's has one row: every token is type 0).
    pub token_types: bool,
    /// Whether positions count from the padding index (transformers'
    /// `create_position_ids_from_input_ids`) rather than from 0.
    pub positions_from_padding: bool,
    /// Whether the input is images (patch embeddings) rather than tokens.
    pub images: bool,
    /// Whether each sublayer normalizes its input (pre-LN: `x + f(LN(x))`, ViT) rather than its
    /// residual sum (post-LN: `LN(x + f(x))`, the text encoders).
    pub pre_norm: bool,
    /// Whether the attention output goes through dropout before its residual (not DistilBERT's).
    pub attention_output_dropout: bool,
    /// Its classification head.
    pub head: HeadSpec,
}

const BERT_SITES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// RoBERTa's and MPNet's head.
const CLASSIFIER_HEAD: HeadSpec = HeadSpec {
    dense: "classifier.dense",
    activation: HeadActivation::Tanh,
    dense_trains: true,
    dropout_first: true,
    out: "classifier.out_proj",
};

const BERT: FamilySpec = FamilySpec {
    model_type: "bert",
    architecture: "BertForSequenceClassification",
    qa_architecture: Some("BertForQuestionAnswering"),
    prefix: "bert.",
    base_modules: &["embeddings", "encoder", "pooler"],
    encoder_layers: "encoder.layer",
    layers_path: "bert.encoder.layer",
    site_paths: BERT_SITES,
    layer_norm_paths: ["attention.output.LayerNorm", "output.LayerNorm"],
    default_targets: ["query", "value"],
    token_types: true,
    positions_from_padding: false,
    images: false,
    pre_norm: false,
    attention_output_dropout: true,
    head: HeadSpec {
        dense: "pooler.dense",
        activation: HeadActivation::Tanh,
        dense_trains: false,
        dropout_first: false,
        out: "classifier",
    },
};

const ROBERTA: FamilySpec = FamilySpec {
    model_type: "roberta",
    architecture: "RobertaForSequenceClassification",
    qa_architecture: Some("RobertaForQuestionAnswering"),
    prefix: "roberta.",
    // Its sequence classifier has no pooler (a base checkpoint's is left out).
    base_modules: &["embeddings", "encoder"],
    layers_path: "roberta.encoder.layer",
    positions_from_padding: true,
    head: CLASSIFIER_HEAD,
    ..BERT
};

const MPNET: FamilySpec = FamilySpec {
    model_type: "mpnet",
    architecture: "MPNetForSequenceClassification",
    qa_architecture: Some("MPNetForQuestionAnswering"),
    prefix: "mpnet.",
    layers_path: "mpnet.encoder.layer",
    site_paths: [
        "attention.attn.q",
        "attention.attn.k",
        "attention.attn.v",
        "attention.attn.o",
        "intermediate.dense",
        "output.dense",
    ],
    layer_norm_paths: ["attention.LayerNorm", "output.LayerNorm"],
    default_targets: ["q", "v"],
    token_types: false,
    ..ROBERTA
};

const DISTILBERT: FamilySpec = FamilySpec {
    model_type: "distilbert",
    architecture: "DistilBertForSequenceClassification",
    qa_architecture: Some("DistilBertForQuestionAnswering"),
    prefix: "distilbert.",
    base_modules: &["embeddings", "transformer"],
    encoder_layers: "transformer.layer",
    layers_path: "distilbert.transformer.layer",
    site_paths: [
        "attention.q_lin",
        "attention.k_lin",
        "attention.v_lin",
        "attention.out_lin",
        "ffn.lin1",
        "ffn.lin2",
    ],
    layer_norm_paths: ["sa_layer_norm", "output_layer_norm"],
    default_targets: ["q_lin", "v_lin"],
    token_types: false,
    attention_output_dropout: false,
    head: HeadSpec {
        dense: "pre_classifier",
        activation: HeadActivation::Relu,
        dense_trains: true,
        dropout_first: false,
        out: "classifier",
    },
    ..BERT
};

const VIT: FamilySpec = FamilySpec {
    model_type: "vit",
    architecture: "ViTForImageClassification",
    qa_architecture: None,
    prefix: "vit.",
    // The image classifier has no pooler (its final LayerNorm runs in `ImageHead`).
    base_modules: &["embeddings", "encoder", "layernorm"],
    layers_path: "vit.encoder.layer",
    site_paths: [
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
    layer_norm_paths: ["layernorm_before", "layernorm_after"],
    token_types: false,
    images: true,
    pre_norm: true,
    // No dense layer: the final LayerNorm (`vit.layernorm`, frozen) takes its place in
    // `model::vit::ImageHead`; only `classifier` trains.
    head: HeadSpec {
        dense: "vit.layernorm",
        ..BERT.head
    },
    ..BERT
};

impl EncoderFamily {
    /// The text encoders (token inputs).
    pub const TEXT: [EncoderFamily; 4] = [
        EncoderFamily::Bert,
        EncoderFamily::Roberta,
        EncoderFamily::MPNet,
        EncoderFamily::DistilBert,
    ];

    pub const ALL: [EncoderFamily; 5] = [
        EncoderFamily::Bert,
        EncoderFamily::Roberta,
        EncoderFamily::MPNet,
        EncoderFamily::DistilBert,
        EncoderFamily::ViT,
    ];

    /// Its row of the table.
    pub fn spec(self) -> &'static FamilySpec {
        match self {
            EncoderFamily::Bert => &BERT,
            EncoderFamily::Roberta => &ROBERTA,
            EncoderFamily::MPNet => &MPNET,
            EncoderFamily::DistilBert => &DISTILBERT,
            EncoderFamily::ViT => &VIT,
        }
    }

    /// [`FamilySpec::qa_architecture`], or the error that `--task qa` gives for the family.
    pub fn qa_support(self) -> Result<&'static str, String> {
        self.spec().qa_architecture.ok_or_else(|| {
            format!(
                "question answering (--task qa) needs a text encoder (BERT, RoBERTa, MPNet, \
                 DistilBERT), not model_type '{}'",
                self.spec().model_type
            )
        })
    }

    /// The checkpoint prefixes its tensors may carry (a task model's, then the bare model's).
    pub fn prefixes(self) -> [&'static str; 2] {
        [self.spec().prefix, ""]
    }

    /// The layers' path and the six linears' paths (in `Site::ALL` order) as transformers 5
    /// names the modules after loading the checkpoint, where it renames them (ViT: its
    /// conversion mapping `ViTModel`); None where the checkpoint's names are the modules' names.
    pub fn renamed_paths(self) -> Option<(&'static str, &'static [&'static str])> {
        const VIT: [&str; 6] = [
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
            "attention.o_proj",
            "mlp.fc1",
            "mlp.fc2",
        ];
        (self == EncoderFamily::ViT).then_some(("vit.layers", &VIT))
    }

    /// The name of a BERT config key in the family's `config.json` (DistilBERT's differ), for
    /// errors that name the key the file has.
    pub fn config_key(self, bert_key: &'static str) -> &'static str {
        if self != EncoderFamily::DistilBert {
            return bert_key;
        }
        match bert_key {
            "hidden_size" => "dim",
            "num_hidden_layers" => "n_layers",
            "num_attention_heads" => "n_heads",
            "intermediate_size" => "hidden_dim",
            "hidden_act" => "activation",
            "hidden_dropout_prob" => "dropout",
            "attention_probs_dropout_prob" => "attention_dropout",
            "classifier_dropout" => "seq_classif_dropout",
            other => other,
        }
    }
}

/// DistilBERT's `config.json` keys (transformers' `DistilBertConfig`).
#[derive(Deserialize)]
struct DistilBertKeys {
    vocab_size: usize,
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    hidden_dim: usize,
    #[serde(default = "default_act")]
    activation: String,
    #[serde(default = "default_dropout")]
    dropout: f64,
    #[serde(default = "default_dropout")]
    attention_dropout: f64,
    max_position_embeddings: usize,
    #[serde(default)]
    sinusoidal_pos_embds: bool,
    #[serde(default = "default_seq_classif_dropout")]
    seq_classif_dropout: f64,
    #[serde(default = "default_dropout")]
    qa_dropout: f64,
    #[serde(default)]
    pad_token_id: u32,
}

impl DistilBertKeys {
    fn into_config(self, path: &Path) -> Result<BertConfig, IoError> {
        if self.sinusoidal_pos_embds {
            return Err(IoError::Invalid {
                path: path.into(),
                message: "sinusoidal_pos_embds = true is not supported (only learned position \
                          embeddings)"
                    .into(),
            });
        }
        Ok(BertConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.dim,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            intermediate_size: self.hidden_dim,
            hidden_act: self.activation,
            hidden_dropout_prob: self.dropout,
            attention_probs_dropout_prob: self.attention_dropout,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 0,
            // transformers' DistilBERT LayerNorms use 1e-12, whatever the config says.
            layer_norm_eps: 1e-12,
            pad_token_id: self.pad_token_id,
            model_type: Some("distilbert".into()),
            relative_attention_num_buckets: default_buckets(),
            classifier_dropout: Some(self.seq_classif_dropout),
            qa_dropout: Some(self.qa_dropout),
            image: None,
        })
    }
}

/// ViT's `config.json` keys (transformers' `ViTConfig`).
#[derive(Deserialize)]
struct ViTKeys {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    hidden_dropout_prob: f64,
    #[serde(default)]
    attention_probs_dropout_prob: f64,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_image_size")]
    image_size: usize,
    #[serde(default = "default_patch_size")]
    patch_size: usize,
    #[serde(default = "default_channels")]
    num_channels: usize,
    #[serde(default = "default_true")]
    qkv_bias: bool,
}

impl ViTKeys {
    fn into_config(self, path: &Path) -> Result<BertConfig, IoError> {
        let bad = |message: String| IoError::Invalid {
            path: path.into(),
            message,
        };
        if !self.qkv_bias {
            return Err(bad(
                "qkv_bias = false is not supported (query/key/value biases)".into(),
            ));
        }
        let image = ImageGeometry {
            image_size: self.image_size,
            patch_size: self.patch_size,
            num_channels: self.num_channels,
        };
        // Checked here, before the position count below is computed from them.
        super::check_sizes(
            path,
            &[
                ("image_size", image.image_size, IMAGE_SIZE_MAX),
                ("patch_size", image.patch_size, IMAGE_SIZE_MAX),
                ("num_channels", image.num_channels, CHANNELS_MAX),
            ],
        )?;
        if !image.image_size.is_multiple_of(image.patch_size) {
            return Err(bad(format!(
                "image_size ({}) must be a multiple of patch_size ({})",
                image.image_size, image.patch_size
            )));
        }
        Ok(BertConfig {
            vocab_size: 1,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act,
            hidden_dropout_prob: self.hidden_dropout_prob,
            attention_probs_dropout_prob: self.attention_probs_dropout_prob,
            max_position_embeddings: image.num_patches() + 1,
            type_vocab_size: 0,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: 0,
            model_type: Some("vit".into()),
            relative_attention_num_buckets: default_buckets(),
            // ViT's classifier has no dropout.
            classifier_dropout: Some(0.0),
            qa_dropout: None,
            image: Some(image),
        })
    }
}

/// The largest image side and patch a ViT config may give (pixels), and its most channels.
const IMAGE_SIZE_MAX: usize = 1 << 13;
const CHANNELS_MAX: usize = 16;

fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    16
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_seq_classif_dropout() -> f64 {
    0.2
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_buckets() -> usize {
    32
}

impl BertConfig {
    /// Reads and checks a `config.json`: BERT's keys, or DistilBERT's when its `model_type` is
    /// `distilbert`.
    pub fn from_file(path: &Path) -> std::result::Result<Self, IoError> {
        let text = std::fs::read_to_string(path).map_err(|_| IoError::Missing {
            path: path.into(),
            what: "Hugging Face model config".into(),
        })?;
        let bad = |what: &str, e: serde_json::Error| IoError::Invalid {
            path: path.into(),
            message: format!("not a {what} config ({e})"),
        };
        // Not JSON at all reads as before, "not a BERT config (...)".
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad("BERT", e))?;
        let model_type = value.get("model_type").and_then(|t| t.as_str());
        let distilbert = model_type == Some(EncoderFamily::DistilBert.spec().model_type);
        let cfg: Self = if model_type == Some(EncoderFamily::ViT.spec().model_type) {
            let keys: ViTKeys = serde_json::from_value(value).map_err(|e| bad("ViT", e))?;
            keys.into_config(path)?
        } else if distilbert {
            let keys: DistilBertKeys =
                serde_json::from_value(value).map_err(|e| bad("DistilBERT", e))?;
            keys.into_config(path)?
        } else {
            serde_json::from_value(value).map_err(|e| bad("BERT", e))?
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The family its `model_type` names (validated: an unknown one is refused at load).
    pub fn family(&self) -> EncoderFamily {
        let t = self.model_type.as_deref().unwrap_or("bert");
        EncoderFamily::ALL
            .into_iter()
            .find(|f| f.spec().model_type == t)
            .unwrap_or(EncoderFamily::Bert)
    }

    /// The dropout of the classification head.
    pub fn head_dropout(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// The most tokens a sequence may have: the position table's rows, less the padding index
    /// and the rows below it where positions count from it (RoBERTa's 514 rows hold 512).
    pub fn max_tokens(&self) -> usize {
        if self.family().spec().positions_from_padding {
            self.max_position_embeddings
                .saturating_sub(self.pad_token_id as usize + 1)
        } else {
            self.max_position_embeddings
        }
    }

    /// Every size in range and consistent, with the file and its key named in the error:
    /// checked before any tensor is read or allocated from these numbers.
    pub fn validate(&self, path: &Path) -> std::result::Result<(), IoError> {
        use super::limits;
        let bad = |message: String| IoError::Invalid {
            path: path.into(),
            message,
        };
        let t = self.model_type.as_deref().unwrap_or("bert");
        let Some(family) = EncoderFamily::ALL
            .into_iter()
            .find(|f| f.spec().model_type == t)
        else {
            let known: Vec<&str> = EncoderFamily::ALL
                .iter()
                .map(|f| f.spec().model_type)
                .collect();
            return Err(bad(format!(
                "model_type '{t}' is not supported by the encoder ({})",
                known.join(", ")
            )));
        };
        let key = |k: &'static str| family.config_key(k);
        if self.hidden_act != "gelu" {
            return Err(bad(format!(
                "{} '{}' is not supported (only 'gelu')",
                key("hidden_act"),
                self.hidden_act
            )));
        }
        let mut sizes = vec![
            ("vocab_size", self.vocab_size, limits::VOCAB),
            (key("hidden_size"), self.hidden_size, limits::HIDDEN),
            (
                key("num_hidden_layers"),
                self.num_hidden_layers,
                limits::LAYERS,
            ),
            (
                key("num_attention_heads"),
                self.num_attention_heads,
                limits::HEADS,
            ),
            (
                key("intermediate_size"),
                self.intermediate_size,
                limits::INTERMEDIATE,
            ),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                limits::POSITIONS,
            ),
        ];
        if family.spec().token_types {
            sizes.push(("type_vocab_size", self.type_vocab_size, limits::TYPE_VOCAB));
        }
        if let Some(g) = &self.image {
            sizes.push(("image_size", g.image_size, IMAGE_SIZE_MAX));
            sizes.push(("patch_size", g.patch_size, IMAGE_SIZE_MAX));
            sizes.push(("num_channels", g.num_channels, CHANNELS_MAX));
        }
        if family == EncoderFamily::MPNet {
            sizes.push((
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
                limits::TYPE_VOCAB,
            ));
        }
        super::check_sizes(path, &sizes)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "{} ({}) must be a multiple of {} ({})",
                key("hidden_size"),
                self.hidden_size,
                key("num_attention_heads"),
                self.num_attention_heads
            )));
        }
        let mut dropouts = vec![
            (key("hidden_dropout_prob"), self.hidden_dropout_prob),
            (
                key("attention_probs_dropout_prob"),
                self.attention_probs_dropout_prob,
            ),
        ];
        if let Some(p) = self.classifier_dropout {
            dropouts.push((key("classifier_dropout"), p));
        }
        if let Some(p) = self.qa_dropout {
            dropouts.push(("qa_dropout", p));
        }
        super::check_reals(path, &dropouts, true)?;
        super::check_reals(path, &[("layer_norm_eps", self.layer_norm_eps)], false)?;
        match (&self.image, family.spec().images) {
            (Some(g), true) => {
                if !g.image_size.is_multiple_of(g.patch_size) {
                    return Err(bad(format!(
                        "image_size ({}) must be a multiple of patch_size ({})",
                        g.image_size, g.patch_size
                    )));
                }
                if self.max_position_embeddings != g.num_patches() + 1 {
                    return Err(bad(format!(
                        "{} positions for {} patches and [CLS]",
                        self.max_position_embeddings,
                        g.num_patches()
                    )));
                }
            }
            (None, true) => return Err(bad("a ViT config without image_size".into())),
            (Some(_), false) => return Err(bad(format!("model_type '{t}' takes no images"))),
            (None, false) => {}
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(bad(format!(
                "pad_token_id ({}) must be below vocab_size ({})",
                self.pad_token_id, self.vocab_size
            )));
        }
        if family.spec().positions_from_padding && self.max_tokens() == 0 {
            return Err(bad(format!(
                "max_position_embeddings ({}) leaves no position for a token: positions start \
                 after pad_token_id ({})",
                self.max_position_embeddings, self.pad_token_id
            )));
        }
        Ok(())
    }
}

impl BertConfig {
    /// A BERT of the given sizes with BERT's defaults otherwise (GELU, two token types,
    /// padding id 0, LayerNorm eps 1e-12; `dropout` for the hidden states and the attention
    /// probabilities): the random models of `bench` and of the tests.
    pub fn sized(
        vocab: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        ffn: usize,
        max_positions: usize,
        dropout: f64,
    ) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ffn,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: dropout,
            attention_probs_dropout_prob: dropout,
            max_position_embeddings: max_positions,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            model_type: None,
            relative_attention_num_buckets: 32,
            classifier_dropout: None,
            qa_dropout: None,
            image: None,
        }
    }
}
