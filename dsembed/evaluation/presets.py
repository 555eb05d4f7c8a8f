"""The paper's MTEB task lists and the E5-Mistral query instructions for every task.

Tang & Yang (arXiv 2409.02727) evaluate on 8 STS, 14 retrieval (BEIR without CQADupStack, plus
MSMARCO dev), 6 classification and 11 clustering tasks, with E5-Mistral's one-sentence task
descriptions ("Instruct: {task}\\nQuery: {text}", formatted by the model's own query template).
The strings are pinned here rather than read from mteb's metadata so that a change in mteb cannot
silently change the study; mteb 2.26's `TaskMetadata.prompt` holds the same strings.
"""
from __future__ import annotations

CATEGORIES: tuple[str, ...] = ("sts", "retrieval", "classification", "clustering")

# mteb's TaskMetadata.type -> the study's category name.
CATEGORY_OF_TYPE: dict[str, str] = {
    "STS": "sts",
    "Retrieval": "retrieval",
    "Classification": "classification",
    "Clustering": "clustering",
}

# The main score of each category, as mteb names it.
MAIN_METRIC: dict[str, str] = {
    "sts": "cosine_spearman",
    "retrieval": "ndcg_at_10",
    "classification": "accuracy",
    "clustering": "v_measure",
}

PAPER_TASKS: dict[str, list[str]] = {
    "sts": ["BIOSSES", "SICK-R", "STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark"],
    "retrieval": [
        "ArguAna", "ClimateFEVER", "DBPedia", "FEVER", "FiQA2018", "HotpotQA", "MSMARCO",
        "NFCorpus", "NQ", "QuoraRetrieval", "SCIDOCS", "SciFact", "Touche2020", "TRECCOVID",
    ],
    "classification": [
        "AmazonPolarityClassification", "ToxicConversationsClassification", "ImdbClassification",
        "Banking77Classification", "EmotionClassification",
        "TweetSentimentExtractionClassification",
    ],
    "clustering": [
        "ArxivClusteringP2P", "ArxivClusteringS2S", "BiorxivClusteringP2P", "BiorxivClusteringS2S",
        "MedrxivClusteringP2P", "MedrxivClusteringS2S", "RedditClustering", "RedditClusteringP2P",
        "StackExchangeClustering", "StackExchangeClusteringP2P", "TwentyNewsgroupsClustering",
    ],
}

PRESETS: dict[str, list[str]] = {f"paper-{cat}": names for cat, names in PAPER_TASKS.items()}
PRESETS["paper-all"] = [name for cat in CATEGORIES for name in PAPER_TASKS[cat]]

_STS = "Retrieve semantically similar text."

# E5-Mistral's task descriptions (Wang et al. 2024, Table 13), as used by the paper's evaluation.
E5_TASK_INSTRUCTIONS: dict[str, str] = {
    **{name: _STS for name in PAPER_TASKS["sts"]},
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": (
        "Classify the emotion expressed in the given Twitter message into one of the six emotions: "
        "anger, fear, joy, love, sadness, and surprise"
    ),
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # Local development tasks (../shared/data/tasks) that are not in the paper's list.
    "STSBenchmarkDev": _STS,
    "StackOverflow": "Identify the topic or theme of StackOverflow posts based on the titles",
}

# Used for local tasks with no entry above and no "instruction" in their task.json.
DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "sts": _STS,
    "retrieval": "Given a query, retrieve relevant documents that answer the query",
    "classification": "Classify the given text into its category",
    "clustering": "Identify the topic or theme of the given texts",
}


def default_instruction(name: str, category: str, own: str | None = None) -> str:
    """The query instruction for a task: its own (task.json), E5's by name, else the category's.

    Args:
        name: the task name; local names also match E5 entries with a type suffix
            ("Banking77" finds "Banking77Classification").
        category: one of CATEGORIES.
        own: an instruction the task itself declares; it wins.

    Returns:
        The instruction text, without any template.
    """
    if own:
        return own
    for key in (name, f"{name}Classification", f"{name}Clustering", f"{name}Retrieval"):
        if key in E5_TASK_INSTRUCTIONS:
            return E5_TASK_INSTRUCTIONS[key]
    return DEFAULT_INSTRUCTIONS[category]
