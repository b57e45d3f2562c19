// Greedy completions of prompts by llama.cpp itself (node-llama-cpp's prebuilt binaries, CPU):
// node llama_cpp_complete.mjs MODEL.gguf PROMPTS.json MAX_TOKENS -> one JSON list of texts.
// Each prompt is raw text (special tokens such as <|im_start|> read as such); node_modules must
// resolve from this file's folder (the test links it there).
import fs from "fs";
import {getLlama, LlamaCompletion} from "node-llama-cpp";

const [, , modelPath, promptsPath, maxTokens] = process.argv;
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const out = [];
for (const prompt of JSON.parse(fs.readFileSync(promptsPath, "utf8"))) {
  // one thread: llama.cpp's workers spin while they wait, which stalls on a machine busy with other work
  const context = await model.createContext({contextSize: 1024, threads: 1});
  const completion = new LlamaCompletion({contextSequence: context.getSequence()});
  const tokens = model.tokenize(prompt, true);  // true: <|im_start|> and the like as the special tokens they are
  out.push(await completion.generateCompletion(tokens, {maxTokens: Number(maxTokens), temperature: 0}));
  await context.dispose();
}
console.log(JSON.stringify(out));
