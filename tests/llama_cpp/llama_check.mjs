#!/usr/bin/env node
// llama_check.mjs — tokenize texts and greedily decode with real llama.cpp (node-llama-cpp prebuilt CPU binary).
//
// Usage:
//   node llama_check.mjs MODEL.gguf '{"tokenize": ["text1", ...], "prompt_tokens": [1,2,3], "n_predict": 16}'
//   node llama_check.mjs MODEL.gguf request.json      # JSON read from a file
//   node llama_check.mjs MODEL.gguf -                 # JSON read from stdin
//
// Request fields (all optional):
//   tokenize:      array of strings; each is tokenized twice, never adding BOS/EOS:
//                  "plain"   = special tokens NOT parsed (`<|im_start|>` becomes ordinary text pieces)
//                  "special" = special tokens parsed (like HF tokenizers, `<|im_start|>` -> its id)
//   prompt_tokens: array of token ids to decode from (used as-is; no BOS is added)
//   prompt_text:   alternative to prompt_tokens: tokenized with special-token parsing, no BOS added
//   n_predict:     number of tokens to greedily generate (default 16)
//   stop_at_eog:   stop after an end-of-generation token (EOS/EOT) is produced (default true; the EOG id is included)
//   threads:       CPU threads for evaluation (default 1)
//   context_size:  context size (default: prompt length + n_predict, rounded up to 64, minimum 256)
//
// Output (stdout, one JSON object):
//   {"tokens": {"plain": [[...],...], "special": [[...],...]}, "prompt_tokens": [...],
//    "greedy": [...], "greedy_text": "...", "bos": id|null, "eos": id|null, "eot": id|null,
//    "should_prepend_bos": bool, "llama_cpp_release": "..."}
// Diagnostics go to stderr; exit code 1 on error.
import fs from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

function readRequest(arg) {
    if (arg == null) return {};
    const s = arg.trim();
    if (s.startsWith("{")) return JSON.parse(s);
    if (s === "-") return JSON.parse(fs.readFileSync(0, "utf8"));
    return JSON.parse(fs.readFileSync(arg, "utf8"));
}

async function main() {
    const [modelPath, reqArg] = process.argv.slice(2);
    if (!modelPath) {
        process.stderr.write("usage: node llama_check.mjs MODEL.gguf '<json>'|FILE.json|-\n");
        process.exit(2);
    }
    const req = readRequest(reqArg);
    const threads = Number.isInteger(req.threads) ? req.threads : 1;
    const nPredict = Number.isInteger(req.n_predict) ? req.n_predict : 16;
    const stopAtEog = req.stop_at_eog !== false;

    // gpu:false -> CPU-only prebuilt; build:"never" -> never compile from source (and never download llama.cpp source).
    const llama = await getLlama({
        gpu: false,
        build: "never",
        skipDownload: true,
        usePrebuiltBinaries: true,
        progressLogs: false,
        logLevel: LlamaLogLevel.error,
        logger: (level, message) => { process.stderr.write(`[llama.cpp ${level}] ${message}\n`); },
        maxThreads: threads,
    });

    const wantsGeneration = nPredict > 0 &&
        ((Array.isArray(req.prompt_tokens) && req.prompt_tokens.length > 0) ||
         (typeof req.prompt_text === "string" && req.prompt_text.length > 0));
    // vocabOnly skips loading weights when only tokenization is requested
    const model = await llama.loadModel({ modelPath, gpuLayers: 0, vocabOnly: !wantsGeneration });
    const out = {
        llama_cpp_release: llama.llamaCppRelease?.release ?? null,
        build_type: llama.buildType ?? null,
        bos: model.tokens.bos,
        eos: model.tokens.eos,
        eot: model.tokens.eot,
        should_prepend_bos: model.tokens.shouldPrependBosToken,
    };

    // (a) tokenization: model.tokenize(text, specialTokens) calls common_tokenize(vocab, text, add_special=false, parse_special)
    const texts = Array.isArray(req.tokenize) ? req.tokenize : [];
    out.tokens = {
        plain: texts.map((t) => model.tokenize(t, false)),
        special: texts.map((t) => model.tokenize(t, true)),
    };

    // (b) greedy decoding
    let prompt = null;
    if (Array.isArray(req.prompt_tokens)) prompt = req.prompt_tokens.map((x) => Number(x));
    else if (typeof req.prompt_text === "string") prompt = model.tokenize(req.prompt_text, true);

    if (prompt != null && prompt.length > 0 && nPredict > 0) {
        const need = prompt.length + nPredict;
        const contextSize = Number.isInteger(req.context_size)
            ? req.context_size
            : Math.max(256, Math.ceil(need / 64) * 64);
        const context = await model.createContext({
            contextSize,
            batchSize: Math.min(contextSize, 512),
            sequences: 1,
            threads,
            flashAttention: false,
        });
        const sequence = context.getSequence();
        const eog = new Set([model.tokens.eos, model.tokens.eot].filter((x) => x != null));
        const generated = [];
        // temperature 0 => llama_sampler_init_greedy (topK/topP/minP are not added to the chain);
        // no repeatPenalty / dryRepeatPenalty / tokenBias / grammar => none of those samplers are added.
        // yieldEogToken:true so EOS/EOT is returned instead of silently ending the generator.
        for await (const token of sequence.evaluate(prompt, { temperature: 0, yieldEogToken: true })) {
            generated.push(token);
            if (generated.length >= nPredict) break;
            if (stopAtEog && (eog.has(token) || model.isEogToken(token))) break;
        }
        out.prompt_tokens = prompt;
        out.greedy = generated;
        out.greedy_text = model.detokenize(generated, true);
        await context.dispose();
    } else {
        out.prompt_tokens = prompt ?? [];
        out.greedy = [];
    }

    await model.dispose();
    await llama.dispose();
    process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
    process.stderr.write(`llama_check error: ${err?.stack ?? err}\n`);
    process.exit(1);
});
