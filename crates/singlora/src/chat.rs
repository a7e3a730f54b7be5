//! Chat templates: a Hugging Face chat model's prompt format (the Jinja `chat_template` of
//! tokenizer_config.json or of a GGUF file's metadata), rendered with minijinja. SFT training
//! wraps each prompt as one user turn with the assistant's turn opened
//! (`add_generation_prompt`), and `predict` does the same, so a model is trained on and asked
//! in the format it was tuned for. The rendered text carries its own special tokens, so it is
//! tokenized without the tokenizer's added ones (as `apply_chat_template` then `encode(...,
//! add_special_tokens=False)` does in transformers).

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use crate::error::{Error, Result};

/// A compiled chat template with the special-token strings it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the token strings templates refer to as
    /// `bos_token`/`eos_token` (empty when the tokenizer has none).
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::msg(format!("chat_template: cannot compile it: {e}")))?;
        Ok(Self {
            env,
            bos: bos.unwrap_or_default(),
            eos: eos.unwrap_or_default(),
        })
    }

    /// The prompt as one user turn, with the assistant's turn opened.
    pub fn user_prompt(&self, prompt: &str) -> Result<String> {
        self.prompt_with_system(None, prompt)
    }

    /// [`ChatTemplate::user_prompt`] after a system turn, where one is given.
    pub fn prompt_with_system(&self, system: Option<&str>, prompt: &str) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| Error::msg(format!("chat_template: {e}")))?;
        let mut messages = vec![];
        if let Some(system) = system {
            messages.push(context! { role => "system", content => system });
        }
        messages.push(context! { role => "user", content => prompt });
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| Error::msg(format!("chat_template: cannot render a prompt: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (from its tokenizer_config.json), shortened system text.
    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_a_user_turn_with_the_assistant_opened() {
        let t = ChatTemplate::new(SMOL, None, Some("<|im_end|>".into())).unwrap();
        assert_eq!(
            t.user_prompt("Is it good?").unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_system_turn_replaces_the_default_one() {
        let t = ChatTemplate::new(SMOL, None, Some("<|im_end|>".into())).unwrap();
        assert_eq!(
            t.prompt_with_system(Some("Be brief."), "Is it good?").unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn templates_see_bos_and_python_methods() {
        // LLaMA-2 style: bos_token, .strip(), raise_exception in an untaken branch
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% else %}{{ raise_exception('only user turns') }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        assert_eq!(t.user_prompt("  hi  ").unwrap(), "<s>[INST] hi [/INST]");
    }

    #[test]
    fn a_broken_template_is_named() {
        let err = ChatTemplate::new("{% for %}", None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chat_template"), "{err}");
        let t = ChatTemplate::new("{{ raise_exception('no') }}", None, None).unwrap();
        let err = t.user_prompt("x").unwrap_err().to_string();
        assert!(err.contains("chat_template") && err.contains("no"), "{err}");
    }
}
